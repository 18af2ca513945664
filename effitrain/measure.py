"""The ledger row: what a model scores and costs after each stage.

accuracy/loss on a split, parameter counts, sparsity of prunable layers, bytes on disk, and
forward latency (median of timed passes after warm-up, fixed batch and threads).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from effitrain.batch import batch_size, forward, move
from effitrain.precision import PrecisionPolicy

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: PrecisionPolicy, keep_predictions: bool = False) -> dict[str, Any]:
    """Mean cross-entropy and accuracy of `model` over `loader`, in eval mode.

    Returns:
        {"loss": mean loss per example, "accuracy": fraction correct in [0, 1]}, plus
        "labels" and "predictions" (lists of ints, in loader order) with `keep_predictions`.
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    kept_labels: list[int] = []
    kept_predictions: list[int] = []
    for inputs, labels in loader:
        inputs, labels = move(inputs, precision.device), move(labels, precision.device)
        with precision.autocast():
            logits = forward(model, inputs)
        total_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        predicted = logits.argmax(dim=-1)
        correct += (predicted == labels).sum().item()
        count += len(labels)
        if keep_predictions:
            kept_labels += labels.tolist()
            kept_predictions += predicted.tolist()
    model.train(was_training)
    scores: dict[str, Any] = {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1)}
    if keep_predictions:
        scores.update(labels=kept_labels, predictions=kept_predictions)
    return scores


def _integer_weights(module: nn.Module) -> tuple[int, int] | None:
    """(weights, non-zero) of a layer that holds its weight as integers, else None: effitrain's
    quantized/clustered layers (`weight_counts()`) and torch.ao's int8 modules (`weight()`)."""
    if hasattr(module, "weight_counts"):
        return module.weight_counts()
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(module, nn.Embedding) and type(module).__module__.startswith("torch.ao.nn."):
        value = weight()
        if isinstance(value, torch.Tensor) and value.is_quantized:
            levels = value.int_repr()
            return levels.numel(), int(torch.count_nonzero(levels))
    return None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (parameters, non-zero parameters), counting tied parameters once and quantized
    weights (held as integer buffers by modules with `weight_counts()`) as parameters."""
    params = list(model.parameters())
    total, nonzero = sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)
    for module in model.modules():
        counts = _integer_weights(module)
        if counts is not None:
            total, nonzero = total + counts[0], nonzero + counts[1]
        if type(module).__module__.startswith("torch.ao.nn.") and hasattr(module, "bias") and callable(module.bias):
            bias = module.bias()
            if isinstance(bias, torch.Tensor):
                total, nonzero = total + bias.numel(), nonzero + int(torch.count_nonzero(bias))
    return total, nonzero


def sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights in the prunable layers (Linear and Conv weights, also
    when quantized or clustered)."""
    total, zeros = 0, 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, PRUNABLE) and isinstance(weight, torch.Tensor):
            total += weight.numel()
            zeros += int((weight == 0).sum())
        elif getattr(module, "kind", "") != "Embedding" and (counts := _integer_weights(module)) is not None:
            total, zeros = total + counts[0], zeros + counts[0] - counts[1]  # quantized/clustered layers keep their zeros
    return zeros / total if total else 0.0


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: Any, precision: PrecisionPolicy, warmup: int, repeats: int, threads: int | None) -> float:
    """Median wall time in milliseconds of `repeats` forward passes on `inputs`, after `warmup`.

    CPU passes run with `threads` torch threads (restored afterwards); CUDA passes are synchronised.
    """
    was_training = model.training
    model.eval()
    inputs = move(inputs, precision.device)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if precision.device.type == "cuda" else (lambda: None)
    timings = []
    try:
        with precision.autocast():
            for index in range(warmup + repeats):
                sync()
                start = time.perf_counter()
                forward(model, inputs)
                sync()
                if index >= warmup:
                    timings.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    return statistics.median(timings)


def measure(
    model: nn.Module,
    test_loader: Iterable,
    example_inputs: Any,
    precision: PrecisionPolicy,
    model_file: Path,
    *,
    warmup: int,
    repeats: int,
    threads: int | None,
) -> dict[str, Any]:
    """Measure one ledger row for `model`, whose saved file is `model_file`.

    Returns:
        accuracy, loss, params, nonzero_params, sparsity, size_bytes, latency_ms, latency_batch;
        and, apart from the row, "labels"/"predictions" on the test split.
    """
    scores = evaluate(model, test_loader, precision, keep_predictions=True)
    params, nonzero = count_parameters(model)
    return {
        "accuracy": scores["accuracy"],
        "loss": scores["loss"],
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": sparsity(model),
        "size_bytes": model_file.stat().st_size,
        "latency_ms": latency_ms(model, example_inputs, precision, warmup, repeats, threads),
        "latency_batch": batch_size(example_inputs),
        "labels": scores["labels"],
        "predictions": scores["predictions"],
    }
