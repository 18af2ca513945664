"""Backend `weight_only`: integer weights stored packed (uint8; two 4-bit levels per byte) with
scales and zero points, dequantized in the forward pass. Files shrink 4x/8x; compute stays
float, so it runs anywhere, at any bit width here, for Linear, Conv and Embedding layers."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from effitrain.errors import ConfigError
from effitrain.layers import conv_args, replace_layers, run_layer
from effitrain.quant.affine import choose_qparams, dequantize, pack, quantize, unpack
from effitrain.quant.backends import Backend, Calibration, QuantSpec, register


class QuantizedWeight(nn.Module):
    """A Linear/Conv/Embedding layer with its weight stored as packed `bits`-bit integers."""

    def __init__(self, layer: nn.Module, bits: int, scheme: str, per_channel: bool) -> None:
        super().__init__()
        self.kind, self.bits, self.scheme, self.per_channel = type(layer).__name__, bits, scheme, per_channel
        self.shape = tuple(layer.weight.shape)
        if self.kind == "Embedding" and bits == 4 and self.shape[1] % 2:
            raise ConfigError(f"int4 embeddings need an even width (this one is {self.shape[1]}); use bits 8 or skip it")
        self.conv = conv_args(layer)
        scale, zero_point = choose_qparams(layer.weight, bits, scheme, per_channel)
        levels = quantize(layer.weight.detach().float(), scale, zero_point, bits, scheme)
        self.register_buffer("packed", pack(levels, bits, scheme))
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point.to(torch.int16 if bits == 8 else torch.int8))
        bias = getattr(layer, "bias", None)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def weight_counts(self) -> tuple[int, int]:
        """(weights, non-zero weights) held as integers (for the ledger's params columns)."""
        levels = unpack(self.packed, self.bits, self.scheme, self.shape)
        return levels.numel(), int((levels != self.zero_point.to(levels.dtype)).sum())

    def weight(self) -> Tensor:
        return dequantize(unpack(self.packed, self.bits, self.scheme, self.shape), self.scale, self.zero_point.float())

    def forward(self, inputs: Tensor) -> Tensor:
        if self.kind == "Embedding":  # dequantize only the rows looked up
            rows = self.packed.view(self.shape[0], -1)[inputs]
            width = self.shape[1]
            levels = unpack(rows.reshape(-1), self.bits, self.scheme, (*inputs.shape, width))
            scale = self.scale.reshape(-1)[inputs].unsqueeze(-1) if self.per_channel else self.scale
            zero_point = self.zero_point.reshape(-1)[inputs].unsqueeze(-1) if self.per_channel else self.zero_point
            return dequantize(levels, scale, zero_point.float())
        return run_layer(self.kind, inputs, self.weight().to(inputs.dtype), self.bias, self.conv)

    def extra_repr(self) -> str:
        return f"{self.kind} {self.shape}, int{self.bits} {self.scheme}, {'per-channel' if self.per_channel else 'per-tensor'}"


class WeightOnly(Backend):
    name: ClassVar[str] = "weight_only"
    auto_rank: ClassVar[int | None] = 100  # auto's fallback: takes every layer the others did not

    def convert(self, model: nn.Module, names: list[str], spec: QuantSpec, calibration: Calibration | None) -> nn.Module:
        return replace_layers(model, names, lambda layer: QuantizedWeight(layer, spec.bits, spec.scheme, spec.per_channel))


register(WeightOnly())
