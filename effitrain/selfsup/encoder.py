"""Where a classifier's representation is, for pre-training and probing it without labels.

A classifier is an encoder followed by a classification head. The representation of an input
is what the head receives: for a transformers model the mean of its base model's last hidden
states over the real tokens; for any other model the input of its head module, found as a child
named `classifier`, `fc` or `head`, else the last Linear layer with one output per class (or
named in the config). The head's parameters are not the encoder's: pre-training leaves them
untouched (frozen), fine-tuning trains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from effitrain.batch import forward
from effitrain.errors import ConfigError

HEAD_NAMES = ("classifier", "fc", "head")


@dataclass
class Encoder:
    """How to read a model's representation.

    Attributes:
        head: the module whose input is the representation (None for a transformers model).
        transformers: the model is a transformers model (its `base_model`'s hidden states).
    """

    head: str | None
    transformers: bool = False

    def describe(self, model: nn.Module) -> str:
        if self.transformers:
            return f"{type(model.base_model).__name__} (mean of the last hidden states)"
        return f"everything before {self.head} ({type(model.get_submodule(self.head)).__name__})"  # type: ignore[arg-type]

    def features(self, model: nn.Module, inputs: Any) -> Tensor:
        """The representation of `inputs`, one row per example (gradients flow through it)."""
        if self.transformers:
            base = model.base_model
            hidden = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        captured: list[Tensor] = []
        handle = model.get_submodule(self.head).register_forward_pre_hook(lambda module, args: captured.append(args[0]))  # type: ignore[arg-type]
        try:
            forward(model, inputs)
        finally:
            handle.remove()
        return captured[0].flatten(start_dim=1)

    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the representation does not depend on (the head; a transformers pooler)."""
        if self.transformers:
            encoder = {id(param) for name, param in model.base_model.named_parameters() if not name.startswith("pooler.")}
            return [param for param in model.parameters() if id(param) not in encoder]
        return list(model.get_submodule(self.head).parameters())  # type: ignore[arg-type]


def find_encoder(model: nn.Module, setting: str, num_classes: int, where: str) -> Encoder:
    """The encoder of `model` as `setting` (auto, or the name of the head module) says.

    Raises:
        ConfigError: no head found, naming what was looked for.
    """
    if setting != "auto":
        names = dict(model.named_modules())
        if setting not in names or not setting:
            raise ConfigError(f"{where} = {setting!r}: no such module in {type(model).__name__} "
                              f"(allowed: auto, or one of {', '.join(name for name in names if name)[:300]})")
        return Encoder(setting)
    if hasattr(model, "base_model") and getattr(model, "config", None) is not None and model.base_model is not model:
        return Encoder(None, transformers=True)
    children = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in children:
            return Encoder(name)
    last = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and module.out_features == num_classes]
    if last:
        return Encoder(last[-1])
    raise ConfigError(f"{where} = 'auto': found no encoder in {type(model).__name__}: looked for a transformers base model, a child "
                      f"module named {', '.join(HEAD_NAMES)}, and a Linear layer with {num_classes} outputs "
                      "(allowed: the name of the module whose input is the representation)")


def representation_size(encoder: Encoder, model: nn.Module, example: Any) -> int:
    """The width of the representation, from one forward pass on `example` (no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return int(encoder.features(model, example).shape[1])
    finally:
        model.train(was_training)
