"""Quantized layers and the model surgery that puts them in place.

- `QuantizedWeight`: weight-only quantization of a Linear/Conv layer. The weight is stored as
  packed integer levels (uint8; two 4-bit levels per byte) plus scales and zero points, so the
  saved file really shrinks; the forward pass dequantizes and runs the float kernel.
- `FakeQuant`: quantization-aware training. Wraps a Linear/Conv layer; its forward uses the
  fake-quantized weight (and, optionally, fake-quantized inputs at 8 bits, as a dynamic int8
  kernel would see them) with straight-through gradients, so the ordinary trainer trains it.
- `dynamic_int8`: torch.ao's x86/fbgemm dynamic int8 Linear (int8 weights, activations
  quantized per batch at run time), stored as plain int8 tensors plus per-channel scales.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effitrain.errors import ConfigError
from effitrain.quant.affine import choose_qparams, dequantize, fake_quantize, pack, quantize, unpack

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def conv_args(layer: nn.Module) -> dict[str, Any]:
    """The keyword arguments `run_layer` needs besides the weight (stride, padding, …)."""
    if isinstance(layer, nn.Embedding):
        return {"padding_idx": layer.padding_idx}
    return {key: getattr(layer, key) for key in ("stride", "padding", "dilation", "groups")} if not isinstance(layer, nn.Linear) else {}


def run_layer(kind: str, inputs: Tensor, weight: Tensor, bias: Tensor | None, conv: dict[str, Any]) -> Tensor:
    """The forward pass of a Linear/Conv1d/Conv2d layer (by class name) with the given weight."""
    if kind == "Linear":
        return F.linear(inputs, weight, bias)
    if kind == "Conv1d":
        return F.conv1d(inputs, weight, bias, **conv)
    return F.conv2d(inputs, weight, bias, **conv)


class QuantizedWeight(nn.Module):
    """A Linear/Conv layer with its weight stored as packed `bits`-bit integers."""

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


def select_layers(model: nn.Module, skip: list[str], where: str, types: tuple[type, ...] = QUANTIZABLE) -> list[str]:
    """Names of the layers to quantize: every `types` layer not matching a `skip` pattern.

    Raises:
        ConfigError: nothing to quantize, or a skip pattern that matches no layer.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, types)]
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"{where}: pattern {pattern!r} matches no quantizable layer (quantizable: {', '.join(names) or 'none'})")
    chosen = [name for name in names if not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)]
    if not chosen:
        kinds = "/".join(t.__name__ for t in types)
        raise ConfigError(f"{where}: {type(model).__name__} has no {kinds} layers to quantize (after skip: {skip})")
    return chosen


def replace_layers(model: nn.Module, names: list[str], make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Swap each named layer for `make(layer)`, in place."""
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, make(getattr(parent, attribute)))
    return model


def unwrap_fake_quant(model: nn.Module) -> list[str]:
    """Put the trained layers back in place of their FakeQuant wrappers; return their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, FakeQuant)]
    replace_layers(model, names, lambda wrapper: wrapper.layer)
    return names


class DynamicInt8Linear(nn.Module):
    """torch.ao's dynamic int8 Linear (fbgemm/x86 kernels), with its int8 weight kept as plain
    tensors (int8 levels, per-channel scales) so it saves as safetensors and reloads exactly."""

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__()
        weight = layer.weight.detach().float()
        scale, _ = choose_qparams(weight, 8, "symmetric", per_channel=True)
        self.register_buffer("qweight", quantize(weight, scale, torch.zeros_like(scale), 8, "symmetric").to(torch.int8))
        self.register_buffer("scale", scale.flatten().double())
        bias = layer.bias.detach().float().clone() if layer.bias is not None else torch.zeros(weight.shape[0])
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._kernel: list[nn.Module] = []  # a plain list: the packed kernel is rebuilt, never saved

    def weight_counts(self) -> tuple[int, int]:
        return self.qweight.numel(), int(torch.count_nonzero(self.qweight))

    def _build(self) -> nn.Module:
        import warnings

        with warnings.catch_warnings():  # torch.ao announces its move to torchao; these kernels are still the fast CPU path
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as AoDynamicLinear

            kernel = AoDynamicLinear(self.in_features, self.out_features, dtype=torch.qint8)
            qweight = torch._make_per_channel_quantized_tensor(
                self.qweight.cpu(), self.scale.cpu(), torch.zeros_like(self.scale, dtype=torch.int64).cpu(), 0
            )
            kernel.set_weight_bias(qweight, self.bias.detach().cpu())
        return kernel

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._kernel.clear()  # rebuild the packed kernel from the loaded int8 weights

    def forward(self, inputs: Tensor) -> Tensor:
        if not self._kernel:
            self._kernel.append(self._build())
        return self._kernel[0](inputs)
