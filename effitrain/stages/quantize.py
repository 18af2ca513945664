"""`quantize` (post-training) and `qat` (quantization-aware training) stages.

Backends, chosen per device and recorded in the ledger row (`backend`):
- `x86_dynamic`: torch.ao's fbgemm/x86 dynamic int8 kernels for Linear layers (CPU, 8 bits).
  Measured on this project's CPUs: 1.5x faster than fp32 on a MiniLM (torchao's eager int8
  paths were 24x and 1/0.87x slower there, so they are not used on the CPU).
- `weight_only`: integer weights stored packed (int8, or two int4 per byte), dequantized in
  the forward pass: files shrink 4x/8x, compute stays float (any device, any bit width here).
`auto` uses x86_dynamic for Linear layers at 8 bits on a CPU with the x86 engine and
weight_only for everything else (convolutions; int4; GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from effitrain.checkpoint import load_weights
from effitrain.errors import ConfigError
from effitrain.quant.affine import SCHEMES, check_bits
from effitrain.quant.modules import DynamicInt8Linear, FakeQuant, QuantizedWeight, replace_layers, select_layers, unwrap_fake_quant
from effitrain.stages.base import Context, FromSource, Stage
from effitrain.stages.train import TrainingStage, make_trainer

BACKENDS = ("auto", "weight_only", "x86_dynamic")
GRANULARITIES = ("per_channel", "per_tensor")


def available_backends(device: torch.device, bits: int) -> list[str]:
    """Backends that can run on `device` at `bits`."""
    found = ["weight_only"]
    if device.type == "cpu" and bits == 8 and "x86" in torch.backends.quantized.supported_engines:
        found.append("x86_dynamic")
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
        if self.backend == "x86_dynamic" and self.bits != 8:
            raise ConfigError(f"backend = 'x86_dynamic' needs bits = 8 (allowed with bits = {self.bits}: weight_only, auto)")

    def convert(self, model: nn.Module, device: torch.device, where: str) -> str:
        """Replace the chosen layers by quantized ones in place; return the backend description."""
        available = available_backends(device, self.bits)
        if self.backend not in ("auto", *available):
            raise ConfigError(f"{where}.backend = {self.backend!r} is not available on {device.type} at {self.bits} bits (available: {', '.join(available)})")
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
class Quantize(Stage, QuantSettings, FromSource):
    """Post-training quantization of the weights (see the module docstring for backends)."""

    kind = "quantize"

    def __post_init__(self) -> None:
        self.check_quant()

    def check(self, cfg: DictConfig, name: str) -> None:
        self.check_source(cfg, name)

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        return self.start_from(model, ctx)

    def run(self, name: str, model: nn.Module, ctx: Context) -> nn.Module:
        if sum(p.numel() for p in model.parameters()) == 0 and not list(model.buffers()):
            raise ConfigError(f"stage.{name}: the model is empty; nothing to quantize")
        ctx.extra["backend"] = self.convert(model, ctx.device, f"stage.{name}")
        return model

    def load_model(self, model: nn.Module, path: Path) -> nn.Module:
        self.convert(model, next(model.parameters()).device, "resume")
        return load_weights(model, path)


@dataclass
class QAT(TrainingStage, QuantSettings, FromSource):
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
        if self.activation_bits not in (None, 8):
            raise ConfigError(f"activation_bits = {self.activation_bits} is not allowed (allowed: null, 8)")

    def check(self, cfg: DictConfig, name: str) -> None:
        super().check(cfg, name)
        self.check_source(cfg, name)

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        return self.start_from(model, ctx)

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
