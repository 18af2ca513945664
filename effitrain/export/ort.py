"""Latency in ONNX Runtime: the ledger's `latency_ms` when `measure.runtime: onnxruntime`, so the
speedups it shows are the ones a deployment in ONNX Runtime gets."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import nn

from effitrain.errors import ConfigError


def session(path: Path, threads: int | None, cuda: bool) -> Any:
    """An ONNX Runtime session on the CUDA provider when asked and present, else the CPU one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = (["CUDAExecutionProvider"] if cuda and "CUDAExecutionProvider" in ort.get_available_providers() else []) + ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def feed(example: Any) -> dict[str, Any]:
    """ONNX input name -> numpy array for `example` (a tensor or a dict of tensors)."""
    from effitrain.export.formats import input_names, positional

    return {name: tensor.detach().cpu().numpy() for name, tensor in zip(input_names(example)[0], positional(example))}


def time_session(run: Any, inputs: dict[str, Any], warmup: int, repeats: int) -> float:
    """Median milliseconds of `repeats` calls of `run(inputs)` after `warmup`."""
    timings = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        run(inputs)
        if index >= warmup:
            timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def onnxruntime_latency(model: nn.Module, example: Any, warmup: int, repeats: int, threads: int | None, cuda: bool, where: str) -> tuple[float, str]:
    """(median ms per forward of `example` in ONNX Runtime, provider) for `model` exported to ONNX.

    Raises:
        ConfigError: the model has no ONNX graph (names the reason).
    """
    import onnxruntime as ort

    from effitrain.export.formats import FORMATS

    reason = FORMATS["onnx"].refusal(model)
    if reason:
        raise ConfigError(f"{where}: measure.runtime = 'onnxruntime' needs an ONNX graph, and this model has none: {reason} (allowed: measure.runtime=torch)")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.onnx"
        FORMATS["onnx"].write(model, example, path)
        loaded = session(path, threads, cuda)
        milliseconds = time_session(lambda inputs: loaded.run(["logits"], inputs), feed(example), warmup, repeats)
    return milliseconds, f"onnxruntime {ort.__version__} {loaded.get_providers()[0]}"
