"""`trainer.compile`: train through `torch.compile` where it is faster.

`true` compiles the training forward (and so its backward) without asking; `false` never does;
`auto` decides by a short probe at the start of each fit: the loss and its backward on one
training batch, eager and compiled, timed in interleaved rounds (machines are noisy), and keeps
the compiled model only when a step is at least `MARGIN` faster. The probe leaves the run as it
found it: no optimizer step, buffers (BatchNorm statistics) and random states restored, gradients
cleared. Validation and saved weights always use the eager model (they share parameters).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from effitrain.errors import ConfigError, TrainingError

log = logging.getLogger("effitrain")

AUTO = "auto"
MARGIN = 0.05  # compiled steps must be at least 5% faster: a smaller gain is inside the noise of these machines
ROUNDS = 3
MIN_FIT_S = 60  # fits whose eager steps add up to less than this are not worth compiling


@dataclass
class Probe:
    """What the `auto` probe measured (milliseconds per forward+backward step, seconds to compile)."""

    eager_ms: float
    compiled_ms: float | None = None
    compile_s: float | None = None
    error: str | None = None
    short: bool = False  # the fit's eager steps add up to less than MIN_FIT_S: not compiled at all

    @property
    def compiled_wins(self) -> bool:
        return self.error is None and self.compiled_ms is not None and self.compiled_ms <= (1 - MARGIN) * self.eager_ms

    def describe(self, steps: int) -> str:
        """One line: both timings, the compile cost, the choice and why."""
        if self.short:
            return (f"compile auto: eager; this fit is ~{self.eager_ms * steps / 1000:.0f} s of eager steps ({steps} x {self.eager_ms:.1f} ms), "
                    f"under {MIN_FIT_S} s: too short for a compile (tens of seconds on a CPU) to pay back")
        if self.error is not None:
            return f"compile auto: eager ({self.eager_ms:.1f} ms/step); torch.compile failed on this model ({self.error})"
        assert self.compiled_ms is not None and self.compile_s is not None
        ratio = self.eager_ms / self.compiled_ms
        timings = f"eager {self.eager_ms:.1f} ms/step, compiled {self.compiled_ms:.1f} ms/step ({ratio:.2f}x, {self.compile_s:.1f} s to compile)"
        if self.compiled_wins:
            saved = (self.eager_ms - self.compiled_ms) * steps / 1000
            return f"compile auto: compiled; {timings}; saves ~{saved:.0f} s over {steps} steps"
        return f"compile auto: eager; {timings}; compiled is not {MARGIN:.0%} faster"


def check_compiler(setting: Any, device: torch.device | str, where: str = "trainer.compile") -> None:
    """torch.compile on the CPU builds C++ kernels: refuse before any work when no compiler is there."""
    if setting is not False and setting is not None and torch.device(device).type == "cpu":
        if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
            raise ConfigError(f"{where} = {setting!r}: torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH (allowed here: false)")


def compiled_model(model: nn.Module) -> nn.Module:
    # inductor's C++ builder warns "No CUDA runtime is found" on CPU-only machines: not the user's concern
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(model)  # type: ignore[return-value]


def _reason(error: Exception, limit: int) -> str:
    """'Type: first non-empty line' of an error, cut at `limit` characters."""
    first = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first[:limit]}"


def _time(call: Callable[[], None], sync: Callable[[], None]) -> float:
    started = time.perf_counter()
    call()
    sync()
    return (time.perf_counter() - started) * 1000


def probe(step: Callable[[nn.Module], None], model: nn.Module, rounds: int = ROUNDS, sync: Callable[[], None] = lambda: None,
          compile_model: Callable[[nn.Module], nn.Module] | None = None, steps: int | None = None) -> tuple[Probe, nn.Module | None]:
    """Time `step(model)` (forward + backward of one batch) eager and compiled, interleaved.

    Args:
        steps: the steps the fit has left; when their eager time is under MIN_FIT_S, nothing
            is compiled (a compile takes longer than such a fit could save).

    Returns:
        (what was measured, the compiled model or None when it failed or was not built).
    """
    step(model)  # warm-up: allocator, kernels, lazy modules
    sync()
    first = _time(lambda: step(model), sync)
    if steps is not None and first * steps / 1000 < MIN_FIT_S:
        return Probe(eager_ms=first, short=True), None
    try:
        compiled = (compile_model or compiled_model)(model)
        compile_ms = _time(lambda: step(compiled), sync)  # the first call compiles
    except Exception as error:  # dynamo/inductor raise many kinds: the probe reports, the run goes on eager
        return Probe(eager_ms=statistics.median(_time(lambda: step(model), sync) for _ in range(rounds)), error=_reason(error, 160)), None
    eager, fast = [], []
    for _ in range(rounds):
        eager.append(_time(lambda: step(model), sync))
        fast.append(_time(lambda: step(compiled), sync))
    return Probe(statistics.median(eager), statistics.median(fast), compile_ms / 1000), compiled


def training_model(setting: Any, model: nn.Module, step: Callable[[nn.Module], None], steps: int, label: str,
                   sync: Callable[[], None] = lambda: None) -> tuple[nn.Module, str | None]:
    """The module the training loop calls forward on, and the ledger's note about it.

    Args:
        setting: trainer.compile (true, false/null, or 'auto').
        step: forward + backward of one fixed training batch on the given module (for `auto`).
        steps: the optimizer steps left in this fit (for the note).
    """
    if setting is None or setting is False:
        return model, None
    if setting is True:
        compiled = compiled_model(model)
        try:
            step(compiled)  # compile now: a model torch.compile cannot build stops here, before any training
        except Exception as error:
            raise first_step_failed(error, label) from None
        return compiled, "compiled"
    measured, compiled = probe(step, model, sync=sync, steps=steps)
    note = measured.describe(steps)
    log.info("[%s] %s", label, note)
    return (compiled if measured.compiled_wins and compiled is not None else model), note


def first_step_failed(error: Exception, stage: str) -> TrainingError:
    """`compile: true` and torch.compile could not build the model: one line, a way out."""
    return TrainingError(f"[{stage}] trainer.compile = true: torch.compile failed on this model ({_reason(error, 200)}) "
                         "(allowed: trainer.compile=false, or auto to fall back by itself)")
