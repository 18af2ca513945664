"""The ledger row: what a model scores and costs after each stage.

The task's metrics on the test split (for reporting) and on the validation split (for model
selection and sweep objectives), parameter counts, sparsity of weight layers, bytes on disk,
and forward latency (median of timed passes after warm-up, fixed batch and threads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from effitrain.batch import batch_size
from effitrain.layers import WEIGHT_LAYERS
from effitrain.precision import PrecisionPolicy
from effitrain.quant.backends import foreign_counts
from effitrain.retime import interleaved, synchronizer, torch_runner, torch_threads
from effitrain.tasks import Task


def _integer_counts(module: nn.Module) -> tuple[int, int, int, int] | None:
    """(weights, non-zero, other params, non-zero others) of a layer holding integer weights:
    effitrain's quantized/clustered layers (`weight_counts()`), or a backend's own modules."""
    if hasattr(module, "weight_counts"):
        return (*module.weight_counts(), 0, 0)
    return foreign_counts(module)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (parameters, non-zero parameters), counting tied parameters once and quantized
    weights (held as integer buffers) as parameters."""
    params = list(model.parameters())
    total, nonzero = sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)
    for module in model.modules():
        counts = _integer_counts(module)
        if counts is not None:
            total, nonzero = total + counts[0] + counts[2], nonzero + counts[1] + counts[3]
    return total, nonzero


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights in the weight layers (Linear and Conv weights, also
    when quantized or clustered)."""
    total, zeros = 0, 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, WEIGHT_LAYERS) and isinstance(weight, torch.Tensor):
            total += weight.numel()
            zeros += int((weight == 0).sum())
        elif getattr(module, "kind", "") != "Embedding" and (counts := _integer_counts(module)) is not None:
            total, zeros = total + counts[0], zeros + counts[0] - counts[1]  # quantized/clustered layers keep their zeros
    return zeros / total if total else 0.0


def latency_ms(model: nn.Module, inputs: Any, precision: PrecisionPolicy, warmup: int, repeats: int, threads: int | None) -> float:
    """Median wall time in milliseconds of `repeats` forward passes on `inputs`, after `warmup`.

    CPU passes run with `threads` torch threads (restored afterwards); CUDA passes are synchronised.
    """
    was_training = model.training
    try:
        with torch_threads(threads):
            return interleaved({"model": torch_runner(model, inputs, precision)}, 1, repeats, warmup, synchronizer(precision.device))["model"]
    finally:
        model.train(was_training)


def measure(
    model: nn.Module,
    task: Task,
    test_loader: Iterable,
    val_loader: Iterable,
    example_inputs: Any,
    precision: PrecisionPolicy,
    model_file: Path,
    *,
    warmup: int,
    repeats: int,
    threads: int | None,
    task_metrics: bool = True,
) -> dict[str, Any]:
    """Measure one ledger row for `model`, whose saved file is `model_file`.

    Args:
        task_metrics: score the task on test and validation (false for a model that is not a
            finished classifier yet, e.g. after pre-training).

    Returns:
        The task's test metrics (e.g. accuracy, loss), the same on validation as val_<metric>,
        params, nonzero_params, sparsity, size_bytes, latency_ms, latency_batch; and, apart
        from the row, "labels"/"predictions" on the test split when the task predicts labels.
    """
    scores, validation = {}, {}
    if task_metrics:
        scores = task.evaluate(model, test_loader, precision, keep_predictions=True)
        with torch.random.fork_rng(devices=[]):  # an extra pass must not move the RNG the next stages train with
            validation = task.evaluate(model, val_loader, precision)
    params, nonzero = count_parameters(model)
    return {
        **scores,
        **{f"val_{key}": value for key, value in validation.items()},
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": sparsity(model),
        "size_bytes": model_file.stat().st_size,
        "latency_ms": latency_ms(model, example_inputs, precision, warmup, repeats, threads),
        "latency_batch": batch_size(example_inputs),
    }
