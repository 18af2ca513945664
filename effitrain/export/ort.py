"""Latency in ONNX Runtime: the ledger's `latency_ms` when `measure.runtime: onnxruntime`, so the
speedups it shows are the ones a deployment in ONNX Runtime gets."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

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


def onnxruntime_runner(model: nn.Module, example: Any, path: Path, threads: int | None, cuda: bool, where: str) -> Callable[[], Any]:
    """Export `model` to `path` and return one ONNX Runtime forward of `example` (its
    `runtime` attribute names the provider).

    Raises:
        ConfigError: the model has no ONNX graph (names the reason).
    """
    import onnxruntime as ort

    from effitrain.export.formats import FORMATS

    reason = FORMATS["onnx"].refusal(model)
    if reason:
        raise ConfigError(f"{where}: measure.runtime = 'onnxruntime' needs an ONNX graph, and this model has none: {reason} (allowed: measure.runtime=torch)")
    FORMATS["onnx"].write(model, example, path)
    loaded, inputs = session(path, threads, cuda), feed(example)

    def run() -> Any:
        return loaded.run(["logits"], inputs)

    run.runtime = f"onnxruntime {ort.__version__} {loaded.get_providers()[0]}"  # type: ignore[attr-defined]
    return run


def onnxruntime_latency(model: nn.Module, example: Any, warmup: int, repeats: int, threads: int | None, cuda: bool, where: str) -> tuple[float, str]:
    """(median ms per forward of `example` in ONNX Runtime, provider) for `model` exported to ONNX."""
    from effitrain.retime import interleaved

    with tempfile.TemporaryDirectory() as scratch:
        run = onnxruntime_runner(model, example, Path(scratch) / "model.onnx", threads, cuda, where)
        milliseconds = interleaved({"model": run}, 1, repeats, warmup)["model"]
    return milliseconds, run.runtime  # type: ignore[attr-defined]
