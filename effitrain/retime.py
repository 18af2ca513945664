"""The ledger's final latencies, timed side by side.

Each stage is timed right after it runs, minutes apart from the others; on a shared machine other
load moves one row by 2x and the "faster x" column with it. At the end of a run every stage's
saved model is reloaded and timed again in one process, interleaved: several rounds, every model
once per round, the median of each model's round medians. Those figures become `latency_ms`
(what "faster x" divides); the figure taken during the run stays as `latency_ms_during_run`.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from effitrain.batch import forward, move
from effitrain.precision import PrecisionPolicy


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int, passes: int, warmup: int, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median over `rounds` of each runner's median ms over `passes` calls; every runner once per round.

    Args:
        warmup: untimed calls of each runner before the first round.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    rounds_ms: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            samples = []
            for _ in range(passes):
                sync()
                started = time.perf_counter()
                run()
                sync()
                samples.append((time.perf_counter() - started) * 1000.0)
            rounds_ms[name].append(statistics.median(samples))
    return {name: statistics.median(values) for name, values in rounds_ms.items()}


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to `threads` inside, restored after. None is what a lone process
    on this machine uses, also in a multi-process run (whose training processes share the cores
    while rank 0 times alone), so latencies compare across runs."""
    from effitrain.parallel.world import current

    previous = torch.get_num_threads()
    torch.set_num_threads(threads if threads is not None else current().threads_alone)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What makes a timed pass end when its work does (CUDA runs asynchronously)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def torch_runner(model: nn.Module, inputs: Any, precision: PrecisionPolicy) -> Callable[[], Any]:
    """One forward pass of `model` on `inputs` in eval mode, no grad, under the run's autocast."""
    model.eval()
    inputs = move(inputs, precision.device)

    def run() -> Any:
        with torch.no_grad(), precision.autocast():
            return forward(model, inputs)

    return run


def retime(models: dict[str, nn.Module], example: Any, precision: PrecisionPolicy, measure: Any) -> dict[str, float]:
    """Interleaved latencies (ms) of `models` on `example`, in the configured runtime.

    Args:
        measure: the `measure` config (warmup, repeats split over `rounds`, threads, runtime).
    """
    passes = max(3, measure.repeats // measure.rounds)
    with torch_threads(measure.threads), tempfile.TemporaryDirectory() as scratch:
        if measure.runtime == "onnxruntime":
            from effitrain.export.ort import onnxruntime_runner

            runners = {name: onnxruntime_runner(model, example, Path(scratch) / f"{index}.onnx", measure.threads,
                                                precision.device.type == "cuda", f"stage.{name}")
                       for index, (name, model) in enumerate(models.items())}
        else:
            runners = {name: torch_runner(model, example, precision) for name, model in models.items()}
        return interleaved(runners, measure.rounds, passes, measure.warmup, synchronizer(precision.device))


def apply(rows: list[dict[str, Any]], latencies: dict[str, float]) -> None:
    """Put the side-by-side figures in the ledger rows, keeping each stage's own as latency_ms_during_run."""
    for row in rows:
        if row["name"] in latencies:
            metrics = row["metrics"]
            metrics.setdefault("latency_ms_during_run", metrics["latency_ms"])
            metrics["latency_ms"] = latencies[row["name"]]
