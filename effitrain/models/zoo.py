"""Any torchvision classification model by name (resnet18, mobilenet_v3_small, ...)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from effitrain.errors import ConfigError, EffitrainError


def torchvision_model(name: str, num_classes: int, input_shape: Sequence[int] = (3, 224, 224), weights: str | None = None) -> nn.Module:
    """Build torchvision's classification model `name` with a `num_classes` head.

    Args:
        name: a name from `torchvision.models.list_models(torchvision.models)`.
        num_classes: output logits (a pretrained head is replaced when it differs).
        input_shape: shape of one input; torchvision's classifiers take 3 channels.
        weights: pretrained weights name (e.g. "DEFAULT", "IMAGENET1K_V1"), fetched from the
            hub or torch's cache; null for random initialisation.

    Returns:
        The model.
    """
    import torchvision.models as models

    available = models.list_models(models)
    if name not in available:
        raise ConfigError(f"model.name = {name!r} is not a torchvision classification model (allowed: e.g. {', '.join(available[:8])}, ...)")
    if input_shape[0] != 3:
        raise ConfigError(f"model: torchvision's {name} takes 3-channel images, data.input_shape is {list(input_shape)}")
    if weights is None:
        return models.get_model(name, num_classes=num_classes)
    try:
        model = models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as error:  # offline: urllib's URLError is an OSError
        raise EffitrainError(f"model.weights: could not load {name} weights {weights!r} ({str(error).splitlines()[0]})") from None
    except ValueError as error:
        raise ConfigError(f"model.weights = {weights!r}: {error}") from None
    return _replace_head(model, num_classes)


def _replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear layer for a fresh one with `num_classes` outputs when sizes differ."""
    parent, attribute, last = None, "", None
    for module in model.modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear):
                parent, attribute, last = module, child_name, child
    if last is None or parent is None:
        raise EffitrainError("model: found no Linear classifier head to resize")
    if last.out_features != num_classes:
        setattr(parent, attribute, nn.Linear(last.in_features, num_classes))
    return model
