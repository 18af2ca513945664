"""Quantization backends behind one protocol, in a table keyed by name (torchao's handler-table
shape). A stage names a backend (or `auto`); `plan` says which backend converts which layers;
`convert`, `save` and `load` run the plan. Adding a backend (torchao on CUDA, ONNX Runtime)
means one file that defines a `Backend` subclass and calls `register`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from effitrain.checkpoint import load_weights, save_weights
from effitrain.errors import ConfigError, require_choice

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
AUTO = "auto"


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize, whatever the backend.

    Attributes:
        bits: 8 or 4.
        scheme: symmetric | affine.
        per_channel: one scale per output channel (else one per tensor).
        observer: activation range observer for calibrated backends (minmax | moving_average | histogram).
        calibration_batches: training batches calibrated backends observe.
    """

    bits: int
    scheme: str
    per_channel: bool
    observer: str = "histogram"
    calibration_batches: int = 8


@dataclass
class Calibration:
    """Data a calibrated backend needs: example inputs, and the training inputs to observe
    (batch inputs only: the stage splits batches with the task)."""

    example: Any
    batches: Iterable | None = None


class Backend:
    """One way to store and run quantized layers.

    Class attributes:
        name: the config value (`backend: NAME`).
        suffix: the saved model file's suffix.
        layer_types: the layer classes it converts.
        whole_model: it rewrites the whole model (a traced graph), so it cannot share a model
            with other backends.
        calibrated: it observes training batches (`spec.calibration_batches` of them).
        auto_rank: order in which `auto` offers it layers (None: `auto` never picks it).
    """

    name: ClassVar[str] = ""
    suffix: ClassVar[str] = ".safetensors"
    layer_types: ClassVar[tuple[type, ...]] = QUANTIZABLE
    whole_model: ClassVar[bool] = False
    calibrated: ClassVar[bool] = False
    auto_rank: ClassVar[int | None] = None

    def available(self, device: torch.device, bits: int) -> bool:
        """Whether it runs on `device` at `bits`."""
        return True

    def unsupported(self, spec: QuantSpec) -> str | None:
        """Why it cannot store `spec` (one clause naming a fix), or None when it can."""
        return None

    def describe(self, count: int, spec: QuantSpec) -> str:
        """The ledger's `backend` text for `count` converted layers."""
        return f"{self.name} int{spec.bits} x{count}"

    def convert(self, model: nn.Module, names: list[str], spec: QuantSpec, calibration: Calibration | None) -> nn.Module:
        """Quantize the named layers (in place where it can) and return the model."""
        raise NotImplementedError

    def save(self, model: nn.Module, path: Path) -> None:
        save_weights(model, path)

    def load(self, model: nn.Module, names: list[str], spec: QuantSpec, calibration: Calibration | None, path: Path) -> nn.Module:
        """Rebuild the converted structure from the float `model` and load the saved file."""
        return load_weights(self.convert(model, names, spec, calibration), path)

    def foreign_counts(self, module: nn.Module) -> tuple[int, int, int, int] | None:
        """(weights, non-zero weights, other parameters, non-zero others) of a module this backend
        produces that holds its tensors outside `parameters()` and has no `weight_counts()`."""
        return None

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` is this whole-model backend's product (saved in its format)."""
        return False


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add `backend` to the table (its `name` is the config value)."""
    BACKENDS[backend.name] = backend
    return backend


def _load_builtin() -> None:
    # importing a backend's module registers it; the x86 module is the only one touching torch.ao
    from effitrain.quant import weight_only, x86  # noqa: F401


def names() -> tuple[str, ...]:
    """Every backend name a config may give, `auto` first."""
    _load_builtin()
    return (AUTO, *sorted(BACKENDS))


def get(name: str) -> Backend:
    _load_builtin()
    return BACKENDS[name]


def available(device: torch.device, bits: int) -> list[str]:
    """Names of the backends that run on `device` at `bits`."""
    _load_builtin()
    return [name for name in sorted(BACKENDS) if BACKENDS[name].available(device, bits)]


def check(choice: str, spec: QuantSpec, key: str) -> None:
    """Refuse an unknown backend, or one that cannot store `spec` on any device (before any work starts)."""
    require_choice(key, choice, names())
    if choice == AUTO:
        return
    reason = get(choice).unsupported(spec)
    if reason:
        fits = [name for name in names() if name == AUTO or not BACKENDS[name].unsupported(spec)]
        raise ConfigError(f"{key} = {choice!r} {reason} (allowed with these settings: {', '.join(fits)})")


def require(choice: str, device: torch.device, bits: int, where: str) -> None:
    """Refuse a backend that does not run on `device`, naming the ones that do."""
    found = available(device, bits)
    if choice not in (AUTO, *found):
        raise ConfigError(f"{where}.backend = {choice!r} is not available on {device.type} at {bits} bits (available: {', '.join(found)})")


def plan(choice: str, model: nn.Module, layers: list[str], device: torch.device, spec: QuantSpec, where: str) -> list[tuple[Backend, list[str]]]:
    """Which backend converts which of `layers`.

    A named backend takes the layers of its types (the rest stay float). `auto` offers the
    layers to the available backends in `auto_rank` order, each taking the ones it can store.

    Raises:
        ConfigError: the backend does not run here, or would convert nothing.
    """
    require(choice, device, spec.bits, where)
    modules = dict(model.named_modules())
    if choice != AUTO:
        backend = get(choice)
        taken = [name for name in layers if isinstance(modules[name], backend.layer_types)]
        if not taken:
            kinds = "/".join(t.__name__ for t in backend.layer_types)
            raise ConfigError(f"{where}: backend {choice} quantizes {kinds} layers only and this model has none left (allowed: {', '.join(n for n in names() if n != choice)})")
        return [(backend, taken)]
    candidates = sorted((b for b in BACKENDS.values() if b.auto_rank is not None and b.available(device, spec.bits) and not b.unsupported(spec)),
                        key=lambda b: b.auto_rank)  # type: ignore[arg-type,return-value]
    steps, left = [], list(layers)
    for backend in candidates:
        taken = [name for name in left if isinstance(modules[name], backend.layer_types)]
        if taken:
            steps.append((backend, taken))
            left = [name for name in left if name not in taken]
    return steps


def describe(steps: list[tuple[Backend, list[str]]], spec: QuantSpec) -> str:
    return " + ".join(backend.describe(len(layers), spec) for backend, layers in steps)


def convert(model: nn.Module, steps: list[tuple[Backend, list[str]]], spec: QuantSpec, calibration: Calibration | None) -> nn.Module:
    for backend, layers in steps:
        model = backend.convert(model, layers, spec, calibration)
    return model


def whole_model_owner(model: nn.Module) -> Backend | None:
    """The whole-model backend whose product `model` is (saved in its own format), or None."""
    _load_builtin()
    return next((backend for backend in BACKENDS.values() if backend.whole_model and backend.owns(model)), None)


def save(choice: str, model: nn.Module, path: Path) -> Path:
    """Save a model quantized with the configured backend; return the file written.

    `auto` writes one safetensors file for layer backends (or fp32), and the whole-model
    backend's own format (its suffix) when it chose one.
    """
    if choice == AUTO:
        owner = whole_model_owner(model)
        if owner is not None:
            path = path.with_suffix(owner.suffix)
        (owner or Backend()).save(model, path)
        return path
    get(choice).save(model, path)
    return path


def load(model: nn.Module, steps: list[tuple[Backend, list[str]]], spec: QuantSpec, calibration: Calibration | None, path: Path) -> nn.Module:
    """Rebuild the structure `steps` converts (none: the float model) and load the saved file."""
    if len(steps) == 1:
        return steps[0][0].load(model, steps[0][1], spec, calibration, path)
    for backend, layers in steps:  # layer backends: rebuild every structure, then one file
        model = backend.convert(model, layers, spec, calibration)
    return load_weights(model, path)


def suffix(choice: str) -> str:
    """The saved file's suffix for a configured backend (auto mixes layer backends: safetensors)."""
    return ".safetensors" if choice == AUTO else get(choice).suffix


def foreign_counts(module: nn.Module) -> tuple[int, int, int, int] | None:
    """Counts of a backend-produced module holding tensors outside `parameters()` (see Backend)."""
    _load_builtin()
    for backend in BACKENDS.values():
        counts = backend.foreign_counts(module)
        if counts is not None:
            return counts
    return None
