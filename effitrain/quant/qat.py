"""Quantization-aware training: `FakeQuant` wraps a Linear/Conv layer; its forward uses the
fake-quantized weight (and, optionally, fake-quantized inputs at 8 bits, as a dynamic int8
kernel would see them) with straight-through gradients, so the ordinary trainer trains it.
After training, `unwrap_fake_quant` puts the trained float layers back for conversion."""

from __future__ import annotations

from torch import Tensor, nn

from effitrain.layers import conv_args, replace_layers, run_layer
from effitrain.quant.affine import fake_quantize


class FakeQuant(nn.Module):
    """QAT wrapper: trains `layer` through fake-quantized weights (and optionally inputs)."""

    def __init__(self, layer: nn.Module, bits: int, scheme: str, per_channel: bool, activation_bits: int | None) -> None:
        super().__init__()
        self.layer, self.bits, self.scheme, self.per_channel, self.activation_bits = layer, bits, scheme, per_channel, activation_bits
        self.kind, self.conv = type(layer).__name__, conv_args(layer)

    def forward(self, inputs: Tensor) -> Tensor:
        if self.activation_bits is not None:
            inputs = fake_quantize(inputs, self.activation_bits, "affine", per_channel=False)
        weight = fake_quantize(self.layer.weight, self.bits, self.scheme, self.per_channel)
        return run_layer(self.kind, inputs, weight, self.layer.bias, self.conv)


def unwrap_fake_quant(model: nn.Module) -> list[str]:
    """Put the trained layers back in place of their FakeQuant wrappers; return their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, FakeQuant)]
    replace_layers(model, names, lambda wrapper: wrapper.layer)
    return names
