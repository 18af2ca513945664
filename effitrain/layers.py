"""Layer surgery shared by pruning, quantization, low-rank factorisation and clustering:
which layers hold weights, choosing layers by name pattern, swapping layers in place, and
running a Linear/Conv layer with a weight computed on the fly."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor, nn

from effitrain.errors import ConfigError

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # prunable; channel surgery's unit; sparsity counts these


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


def select_layers(model: nn.Module, skip: list[str], where: str, types: tuple[type, ...], purpose: str) -> list[str]:
    """Names of the `types` layers of `model` not matching a `skip` pattern.

    Args:
        purpose: what the caller does to them, for messages ('quantize', 'factorise', 'cluster').

    Raises:
        ConfigError: nothing left to work on, or a skip pattern that matches no candidate layer.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, types)]
    kinds = "/".join(t.__name__ for t in types)
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise ConfigError(f"{where}: pattern {pattern!r} matches no {kinds} layer to {purpose} (candidates: {', '.join(names) or 'none'})")
    chosen = [name for name in names if not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)]
    if not chosen:
        raise ConfigError(f"{where}: {type(model).__name__} has no {kinds} layers to {purpose} (after skip: {skip})")
    return chosen


def replace_layers(model: nn.Module, names: list[str], make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """Swap each named layer for `make(layer)`, in place."""
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, make(getattr(parent, attribute)))
    return model


def matching_modules(model: nn.Module, patterns: list[str], where: str) -> list[nn.Module]:
    """The modules with parameters whose names match `patterns` (fnmatch), outermost only.

    Raises:
        ConfigError: a pattern that matches no module with parameters (listing the top-level ones).
    """
    modules = {name: module for name, module in model.named_modules() if name and any(True for _ in module.parameters())}
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        matched = {name: module for name, module in modules.items() if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            top = [name for name in modules if "." not in name]
            raise ConfigError(f"{where}: pattern {pattern!r} matches no module with parameters (top-level modules: {', '.join(top) or 'none'})")
        chosen.update(matched)
    return [module for name, module in chosen.items() if not any(name.startswith(other + ".") for other in chosen)]
