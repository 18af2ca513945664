"""`quantize` (post-training) and `qat` (quantization-aware training) stages.

Backends, chosen per device and recorded in the ledger row (`backend`):
- `x86_dynamic`: torch.ao's fbgemm/x86 dynamic int8 kernels for Linear layers (CPU, 8 bits).
  Measured on this project's CPUs: 1.5x faster than fp32 on a MiniLM (torchao's eager int8
  paths were 24x and 1/0.87x slower there, so they are not used on the CPU).
- `weight_only`: integer weights stored packed (int8, or two int4 per byte), dequantized in
  the forward pass: files shrink 4x/8x, compute stays float (any device, any bit width here).
- `x86_static`: torch.ao FX static int8 with calibration (observers minmax | moving_average |
  histogram over `calibration_batches` training batches): int8 convolutions and Linear layers
  with int8 activations (CPU, traceable models; `quant/static.py`).
`auto` uses x86_dynamic for Linear layers at 8 bits on a CPU with the x86 engine and
weight_only for everything else (convolutions; int4; GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from effitrain.checkpoint import load_weights
from effitrain.errors import ConfigError
from effitrain.quant import static
from effitrain.quant.affine import SCHEMES, check_bits
from effitrain.quant.modules import DynamicInt8Linear, FakeQuant, QuantizedWeight, replace_layers, select_layers, unwrap_fake_quant
from effitrain.stages.base import Context, FromSource
from effitrain.stages.train import TrainingStage, make_trainer

BACKENDS = ("auto", "weight_only", "x86_dynamic", "x86_static")
GRANULARITIES = ("per_channel", "per_tensor")


def available_backends(device: torch.device, bits: int) -> list[str]:
    """Backends that can run on `device` at `bits`."""
    found = ["weight_only"]
    if device.type == "cpu" and bits == 8 and "x86" in torch.backends.quantized.supported_engines:
        found += ["x86_dynamic", "x86_static"]
    return found


@dataclass
class QuantSettings:
    """Shared fields of `quantize` and `qat`.

    Fields:
        bits: 8 or 4.
        scheme: symmetric | affine.
        granularity: per_channel | per_tensor (weights).
        backend: auto | weight_only | x86_dynamic (see the module docstring).
        skip: module-name patterns left in float (e.g. the first conv).
    """

    bits: int = 8
    scheme: str = "symmetric"
    granularity: str = "per_channel"
    backend: str = "auto"
    skip: List[str] = field(default_factory=list)

    def check_quant(self) -> None:
        check_bits(self.bits, "bits")
        for key, allowed in (("scheme", SCHEMES), ("granularity", GRANULARITIES), ("backend", BACKENDS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is not allowed (allowed: {', '.join(allowed)})")
        if self.backend in ("x86_dynamic", "x86_static") and self.bits != 8:
            raise ConfigError(f"backend = {self.backend!r} needs bits = 8 (allowed with bits = {self.bits}: weight_only, auto)")

    def require_backend(self, device: torch.device, where: str) -> list[str]:
        """The backends available on `device` at these bits; ConfigError when the chosen one is not."""
        available = available_backends(device, self.bits)
        if self.backend not in ("auto", *available):
            raise ConfigError(f"{where}.backend = {self.backend!r} is not available on {device.type} at {self.bits} bits (available: {', '.join(available)})")
        return available

    def convert(self, model: nn.Module, device: torch.device, where: str) -> str:
        """Replace the chosen layers by quantized ones in place; return the backend description."""
        available = self.require_backend(device, where)
        names = select_layers(model, self.skip, f"{where}.skip")
        modules = dict(model.named_modules())
        dynamic = [n for n in names if isinstance(modules[n], nn.Linear)] if "x86_dynamic" in available and self.backend in ("auto", "x86_dynamic") else []
        weight_only = [n for n in names if n not in dynamic] if self.backend != "x86_dynamic" else []
        per_channel = self.granularity == "per_channel"
        replace_layers(model, weight_only, lambda layer: QuantizedWeight(layer, self.bits, self.scheme, per_channel))
        if dynamic:
            if self.scheme != "symmetric" or not per_channel:
                raise ConfigError(f"{where}: x86_dynamic stores symmetric per-channel int8 (set scheme=symmetric granularity=per_channel, or backend=weight_only)")
            replace_layers(model, dynamic, lambda layer: DynamicInt8Linear(layer))
        parts = []
        if dynamic:
            parts.append(f"x86_dynamic int8 x{len(dynamic)}")
        if weight_only:
            parts.append(f"weight_only int{self.bits} x{len(weight_only)}")
        if self.backend == "x86_dynamic" and not dynamic:
            raise ConfigError(f"{where}: backend x86_dynamic quantizes Linear layers only and this model has none left (allowed: weight_only, auto)")
        return " + ".join(parts)


@dataclass
class Quantize(FromSource, QuantSettings):
    """Post-training quantization (see the module docstring for backends).

    Fields:
        calibration_batches: x86_static: training batches the observers see (>= 1).
        observer: x86_static: activation range observer, minmax | moving_average | histogram.
    """

    kind = "quantize"
    calibration_batches: int = 8
    observer: str = "histogram"

    def __post_init__(self) -> None:
        self.check_quant()
        if self.observer not in static.OBSERVERS:
            raise ConfigError(f"observer = {self.observer!r} is not allowed (allowed: {', '.join(static.OBSERVERS)})")
        if self.backend == "x86_static" and self.calibration_batches < 1:
            raise ConfigError(f"calibration_batches = {self.calibration_batches} is not allowed (allowed: an integer >= 1: observers need data)")

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        self._example = ctx.data.example_batch(2)
        return super().prepare(model, ctx)

    def run(self, name: str, model: nn.Module, ctx: Context) -> nn.Module:
        where = f"stage.{name}"
        if sum(p.numel() for p in model.parameters()) == 0:
            raise ConfigError(f"{where}: the model is empty; nothing to quantize")
        if self.backend == "x86_static":
            self.require_backend(ctx.device, where)
            select_layers(model, self.skip, f"{where}.skip")
            model = static.quantize_static(model, self._example, ctx.data.train, self.calibration_batches, self.observer,
                                           self.granularity == "per_channel", where)
            ctx.extra["backend"] = f"x86_static int8 ({self.observer}, {self.calibration_batches} batches)"
            return model
        ctx.extra["backend"] = self.convert(model, ctx.device, where)
        return model

    @property
    def model_suffix(self) -> str:
        return ".pt" if self.backend == "x86_static" else ".safetensors"  # torch.load picks its reader by suffix

    def save_model(self, model: nn.Module, path: Path) -> None:
        if self.backend == "x86_static":
            static.save(model, path)
        else:
            super().save_model(model, path)

    def load_model(self, model: nn.Module, path: Path) -> nn.Module:
        if self.backend == "x86_static":
            return static.rebuild(model, self._example, self.observer, self.granularity == "per_channel", path)
        self.convert(model, next(model.parameters()).device, "resume")
        return load_weights(model, path)


@dataclass
class QAT(FromSource, TrainingStage, QuantSettings):
    """Quantization-aware training: fake-quantized weights (and optionally 8-bit inputs) with
    straight-through gradients, trained by the ordinary trainer, then converted like `quantize`.

    Fields:
        activation_bits: null (weights only) or 8 (also fake-quantize layer inputs per batch, as
            a dynamic int8 kernel does).
    """

    kind = "qat"
    activation_bits: Optional[int] = None

    def __post_init__(self) -> None:
        self.check_quant()
        if self.backend == "x86_static":
            raise ConfigError("backend = 'x86_static' is not allowed for qat (allowed: auto, weight_only, x86_dynamic)")
        if self.activation_bits not in (None, 8):
            raise ConfigError(f"activation_bits = {self.activation_bits} is not allowed (allowed: null, 8)")

    def run(self, name: str, model: nn.Module, ctx: Context) -> nn.Module:
        names = select_layers(model, self.skip, f"stage.{name}.skip")
        per_channel = self.granularity == "per_channel"
        replace_layers(model, names, lambda layer: FakeQuant(layer, self.bits, self.scheme, per_channel, self.activation_bits))
        result = make_trainer(ctx, name, self._overrides()).fit(model, ctx.data.train, ctx.data.val, resume=ctx.resume)
        unwrap_fake_quant(model)
        ctx.extra.update({"epochs": result.epochs, "steps": result.steps, "backend": self.convert(model, ctx.device, f"stage.{name}")})
        return model

    def load_model(self, model: nn.Module, path: Path) -> nn.Module:
        self.convert(model, next(model.parameters()).device, "resume")
        return load_weights(model, path)
