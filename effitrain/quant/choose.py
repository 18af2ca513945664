"""`backend: auto` by measurement: which quantized forms of a model to try, and which to keep.

The stage converts a copy of the model with each candidate, measures every copy's validation
metric, latency (side by side) and file size, and `choose` keeps the fastest (or, preferring
size, the smallest) whose validation metric stays within `max_drop` of the unquantized model's.
The unquantized model is always a candidate, so a quantize stage never makes a model slower
or worse than `max_drop` without saying so: the ledger row lists what was measured and why
the winner won.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effitrain.quant import backends
from effitrain.quant.backends import Backend, QuantSpec

FP32 = "fp32"
PREFERENCES = ("latency", "size")
LATENCY_TIE = 0.05  # latencies within 5% of the fastest count as a tie (timing noise): the smaller file wins it


@dataclass
class Trial:
    """One candidate, measured.

    Attributes:
        name: fp32, a backend's name, or a mix such as x86_dynamic+weight_only.
        steps: (backend, layer names) conversions; empty for fp32.
        metric: the validation metric the choice is bounded by.
        latency_ms: median forward time on the measurement batch (interleaved with the others).
        size_bytes: the saved file's size.
    """

    name: str
    steps: list[tuple[Backend, list[str]]]
    metric: float = float("nan")
    latency_ms: float = float("nan")
    size_bytes: int = 0


def candidates(model: nn.Module, layers: list[str], device: torch.device, spec: QuantSpec, traceable: bool) -> list[Trial]:
    """fp32, the per-layer mix (each layer to the first backend that takes it), and each
    available backend alone (a whole-model backend only when the model traces)."""
    trials = [Trial(FP32, [])]
    mix = backends.plan(backends.AUTO, model, layers, device, spec, "auto")
    if mix:
        trials.append(Trial("+".join(backend.name for backend, _ in mix), mix))
    modules = dict(model.named_modules())
    for name in backends.available(device, spec.bits):
        backend = backends.get(name)
        if backend.unsupported(spec) or (backend.whole_model and not traceable):
            continue
        taken = [layer for layer in layers if isinstance(modules[layer], backend.layer_types)]
        if taken and all(trial.name != name for trial in trials):
            trials.append(Trial(name, [(backend, taken)]))
    return trials


def choose(trials: list[Trial], direction: str, max_drop: float, prefer: str) -> tuple[Trial, str]:
    """The trial to keep and why, in words.

    A trial whose metric is NaN (diverged) is never within the bound.

    Args:
        trials: measured; the first is fp32 (the stage's input), the reference for the drop.
        direction: 'max' or 'min' (which way the validation metric is better).
        max_drop: the largest allowed loss of the validation metric against fp32.
        prefer: 'latency' (fastest within the bound) or 'size' (smallest within the bound).
    """
    reference = trials[0]
    drop = (lambda t: reference.metric - t.metric) if direction == "max" else (lambda t: t.metric - reference.metric)
    within = [trial for trial in trials if drop(trial) <= max_drop + 1e-12 or trial is reference]
    if prefer == "size":
        winner = min(within, key=lambda t: (t.size_bytes, t.latency_ms))
        reason = f"smallest within {max_drop:g} of fp32's validation metric"
        if winner.latency_ms > reference.latency_ms:
            reason += f"; costs {winner.latency_ms / reference.latency_ms:.2f}x fp32's latency"
    else:
        fastest = min(trial.latency_ms for trial in within)
        tied = [trial for trial in within if trial.latency_ms <= fastest * (1 + LATENCY_TIE)]
        winner = min(tied, key=lambda t: (t.size_bytes, t.latency_ms))
        reason = f"fastest within {max_drop:g} of fp32's validation metric"
        if winner.latency_ms > fastest:
            reason += f", smallest of those within {LATENCY_TIE:.0%} of the fastest"
    left_out = [trial.name for trial in trials if trial not in within]
    if left_out:
        reason += f"; {', '.join(left_out)} lost more"
    return winner, reason


def describe(trials: list[Trial], winner: Trial, reason: str, prefer: str) -> str:
    """The ledger's backend text, e.g. 'auto: fp32 0.32 ms, x86_dynamic 0.47 ms -> fp32 (fastest ...)'."""
    shown = (lambda t: f"{t.name} {t.size_bytes / 1024:.1f} KiB {t.latency_ms:.3f} ms") if prefer == "size" else (lambda t: f"{t.name} {t.latency_ms:.3f} ms")
    return f"auto: {', '.join(shown(t) for t in trials)} -> {winner.name} ({reason})"


def summary(trials: list[Trial]) -> list[dict[str, Any]]:
    """The trials as ledger data (`auto_trials`)."""
    return [{"name": t.name, "metric": t.metric, "latency_ms": t.latency_ms, "size_bytes": t.size_bytes} for t in trials]
