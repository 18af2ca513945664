"""Backends on torch.ao's x86/fbgemm int8 kernels, the fast int8 path on this project's CPUs
(torch.ao is deprecated in favour of torchao, whose eager int8 paths were measured much slower
here; this file is the only one that touches torch.ao):

- `x86_dynamic`: dynamic int8 Linear (int8 weights, activations quantized per batch at run
  time), stored as plain int8 tensors plus per-channel scales, so it saves as safetensors.
- `x86_static`: FX graph mode static int8 with calibration: observers record activation ranges
  over calibration batches, then convolutions and Linear layers run as int8 kernels with int8
  activations between them. Needs a model torch.fx can trace (not Hugging Face transformers).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from effitrain.batch import move
from effitrain.checkpoint import atomic_write
from effitrain.errors import ConfigError
from effitrain.layers import replace_layers
from effitrain.quant.affine import choose_qparams, quantize
from effitrain.quant.backends import Backend, Calibration, QuantSpec, register

OBSERVERS = ("minmax", "moving_average", "histogram")
CPU = torch.device("cpu")


def _x86_here(device: torch.device, bits: int) -> bool:
    return device.type == "cpu" and bits == 8 and "x86" in torch.backends.quantized.supported_engines


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


class X86Dynamic(Backend):
    name: ClassVar[str] = "x86_dynamic"
    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear,)
    auto_rank: ClassVar[int | None] = 0  # measured 1.5x faster than fp32 on the MiniLM: auto's first choice for Linear

    def available(self, device: torch.device, bits: int) -> bool:
        return _x86_here(device, bits)

    def unsupported(self, spec: QuantSpec) -> str | None:
        if spec.bits != 8:
            return "needs bits = 8"
        if spec.scheme != "symmetric" or not spec.per_channel:
            return "stores symmetric per-channel int8 (set scheme=symmetric granularity=per_channel)"
        return None

    def convert(self, model: nn.Module, names: list[str], spec: QuantSpec, calibration: Calibration | None) -> nn.Module:
        return replace_layers(model, names, DynamicInt8Linear)


def _qconfig_mapping(observer: str, per_channel: bool, float_layers: list[str] = ()) -> Any:  # type: ignore[assignment]
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import (
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
        PerChannelMinMaxObserver,
    )

    activation = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver, "histogram": HistogramObserver}[observer]
    weight = (PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric) if per_channel
              else MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
    # x86 kernels want 7-bit activation ranges (reduce_range) to avoid overflow in their int16 accumulation
    mapping = QConfigMapping().set_global(QConfig(activation=activation.with_args(dtype=torch.quint8, reduce_range=True), weight=weight))
    for name in float_layers:  # `skip` patterns: these layers stay in float
        mapping.set_module_name(name, None)
    return mapping


def _prepare(model: nn.Module, names: list[str], example: Any, spec: QuantSpec, where: str) -> nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = "x86"
    float_layers = [name for name, module in model.named_modules() if isinstance(module, X86Static.layer_types) and name not in names]
    try:
        return prepare_fx(model.cpu().eval(), _qconfig_mapping(spec.observer, spec.per_channel, float_layers), example_inputs=(move(example, CPU),))
    except Exception as error:  # torch.fx meets Python control flow it cannot trace
        raise ConfigError(
            f"{where}: backend x86_static needs a model torch.fx can trace; {type(model).__name__} cannot be "
            f"({type(error).__name__}: {str(error).splitlines()[0][:160]}) (allowed here: auto, weight_only, x86_dynamic)"
        ) from None


class X86Static(Backend):
    name: ClassVar[str] = "x86_static"
    suffix: ClassVar[str] = ".pt"  # quantized tensors are not plain tensors: torch.save, read back with weights_only
    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear, nn.Conv1d, nn.Conv2d)
    whole_model: ClassVar[bool] = True
    calibrated: ClassVar[bool] = True

    def available(self, device: torch.device, bits: int) -> bool:
        return _x86_here(device, bits)

    def unsupported(self, spec: QuantSpec) -> str | None:
        return "needs bits = 8" if spec.bits != 8 else None

    def describe(self, count: int, spec: QuantSpec) -> str:
        return f"x86_static int8 ({spec.observer}, {spec.calibration_batches} batches)"

    def convert(self, model: nn.Module, names: list[str], spec: QuantSpec, calibration: Calibration | None) -> nn.Module:
        """Calibrate on `spec.calibration_batches` batches and return the int8 model (a torch.fx GraphModule)."""
        from torch.ao.quantization.quantize_fx import convert_fx

        assert calibration is not None and calibration.batches is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's notice that it moves to torchao; its x86 kernels remain the fast CPU path
            prepared = _prepare(model, names, calibration.example, spec, "x86_static")
            seen = 0
            with torch.no_grad():
                for inputs in calibration.batches:
                    prepared(move(inputs, CPU))
                    seen += 1
                    if seen >= spec.calibration_batches:
                        break
            return convert_fx(prepared)

    def save(self, model: nn.Module, path: Path) -> None:
        atomic_write(path, lambda temp: torch.save(model.state_dict(), temp))

    def load(self, model: nn.Module, names: list[str], spec: QuantSpec, calibration: Calibration | None, path: Path) -> nn.Module:
        """The int8 structure from the float model, with the saved scales, zero points and weights loaded."""
        from torch.ao.quantization.quantize_fx import convert_fx

        assert calibration is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = _prepare(model, names, calibration.example, spec, "resume")
            with torch.no_grad():
                prepared(move(calibration.example, CPU))  # any data: the saved scales and zero points replace these
            quantized = convert_fx(prepared)
            quantized.load_state_dict(torch.load(path, weights_only=True))
        return quantized

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, torch.fx.GraphModule) and any(
            type(module).__module__.startswith("torch.ao.nn.quantized") for module in model.modules())

    def foreign_counts(self, module: nn.Module) -> tuple[int, int, int, int] | None:
        """torch.ao's int8 modules hold weight and bias as packed params, outside `parameters()`."""
        if not type(module).__module__.startswith("torch.ao.nn.") or isinstance(module, nn.Embedding):
            return None
        weight = module.weight() if callable(getattr(module, "weight", None)) else None
        if not (isinstance(weight, torch.Tensor) and weight.is_quantized):
            return None
        levels = weight.int_repr()
        bias = module.bias() if callable(getattr(module, "bias", None)) else None
        bias_count = (bias.numel(), int(torch.count_nonzero(bias))) if isinstance(bias, torch.Tensor) else (0, 0)
        return levels.numel(), int(torch.count_nonzero(levels)), *bias_count


register(X86Dynamic())
register(X86Static())
