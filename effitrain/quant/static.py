"""Static int8 post-training quantization with calibration (torch.ao FX graph mode, x86/fbgemm
kernels): observers record activation ranges over calibration batches, then convolutions and
Linear layers run as int8 kernels with int8 activations between them. Needs a model that
torch.fx can trace (the CNNs here; not Hugging Face transformers).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from effitrain.batch import move
from effitrain.checkpoint import atomic_write
from effitrain.errors import ConfigError

OBSERVERS = ("minmax", "moving_average", "histogram")


def _qconfig_mapping(observer: str, per_channel: bool) -> Any:
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
    return QConfigMapping().set_global(QConfig(activation=activation.with_args(dtype=torch.quint8, reduce_range=True), weight=weight))


def _prepare(model: nn.Module, example: Any, observer: str, per_channel: bool, where: str) -> nn.Module:
    from torch.ao.quantization.quantize_fx import prepare_fx

    torch.backends.quantized.engine = "x86"
    try:
        return prepare_fx(model.eval(), _qconfig_mapping(observer, per_channel), example_inputs=(example,))
    except Exception as error:  # torch.fx meets Python control flow it cannot trace
        raise ConfigError(
            f"{where}: backend x86_static needs a model torch.fx can trace; {type(model).__name__} cannot be "
            f"({type(error).__name__}: {str(error).splitlines()[0][:160]}) (allowed here: auto, weight_only, x86_dynamic)"
        ) from None


def quantize_static(model: nn.Module, example: Any, batches: Iterable, count: int, observer: str, per_channel: bool, where: str) -> nn.Module:
    """Calibrate on `count` batches and return the int8 model (a torch.fx GraphModule)."""
    from torch.ao.quantization.quantize_fx import convert_fx

    if count < 1:
        raise ConfigError(f"{where}.calibration_batches = {count} is not allowed (allowed: an integer >= 1: observers need data)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that it moves to torchao; its x86 kernels remain the fast CPU path
        prepared = _prepare(model.cpu(), example.cpu(), observer, per_channel, where)
        seen = 0
        with torch.no_grad():
            for inputs, _ in batches:
                prepared(move(inputs, torch.device("cpu")))
                seen += 1
                if seen >= count:
                    break
        return convert_fx(prepared)


def rebuild(model: nn.Module, example: Any, observer: str, per_channel: bool, path: Path) -> nn.Module:
    """The int8 structure from the float model, with the saved quantized state loaded."""
    from torch.ao.quantization.quantize_fx import convert_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = _prepare(model.cpu(), example.cpu(), observer, per_channel, "resume")
        with torch.no_grad():
            prepared(example.cpu())  # any data: the saved scales and zero points replace these
        quantized = convert_fx(prepared)
        quantized.load_state_dict(torch.load(path, weights_only=True))
    return quantized


def save(model: nn.Module, path: Path) -> None:
    """Quantized tensors are not plain tensors (no safetensors): torch.save, read back weights_only."""
    atomic_write(path, lambda temp: torch.save(model.state_dict(), temp))
