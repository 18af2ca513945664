"""Batches as the loaders yield them: (inputs, labels), where inputs is a tensor or a dict of
tensors (tokenised text). One place knows how to move them and feed them to a model."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def move(value: Any, device: torch.device) -> Any:
    """Move a tensor, or the tensors inside a dict/list/tuple, to `device`."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: move(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move(item, device) for item in value)
    return value


def forward(model: nn.Module, inputs: Any) -> Tensor:
    """Return the logits of `model` on `inputs` (keyword inputs for dicts; `.logits` unwrapped)."""
    output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return getattr(output, "logits", output)


def batch_size(inputs: Any) -> int:
    """Number of examples in `inputs`."""
    if isinstance(inputs, dict):
        return len(next(iter(inputs.values())))
    return len(inputs)
