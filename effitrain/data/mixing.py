"""Mixup (Zhang et al. 2017) and CutMix (Yun et al. 2019) on training batches.

`data.mix: {kind, alpha, prob}` wraps the training loader's collate function: a collated batch
is, with probability `prob`, mixed by torchvision's transforms v2 (`MixUp`: pixels blended with a
Beta(alpha, alpha) weight; `CutMix`: a box pasted from another image; `both`: one of the two at
random), and its labels become the matching soft targets, probabilities that sum to one. Every
loss effitrain trains with takes them: cross-entropy accepts probabilities, the KD loss's hard
term likewise, and teachers see the mixed images. Validation and test loaders are never mixed.
The draws come from torch's generator, so a seed fixes them and a resumed run repeats them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from effitrain.errors import ConfigError

KINDS = ("none", "mixup", "cutmix", "both")


class MixCollate:
    """`collate`, then mix the batch with probability `prob`; unmixed batches keep their labels.

    Args:
        collate: the loader's own collate function.
        kind: mixup | cutmix | both.
        alpha: the Beta(alpha, alpha) concentration, > 0.
        prob: probability that a batch is mixed, in [0, 1].
        num_classes: the label count (soft targets have one probability per class).
    """

    def __init__(self, collate: Callable[[list], Any], kind: str, alpha: float, prob: float, num_classes: int) -> None:
        from torchvision.transforms import v2

        self.collate = collate
        self.prob = prob
        mixup, cutmix = v2.MixUp(alpha=alpha, num_classes=num_classes), v2.CutMix(alpha=alpha, num_classes=num_classes)
        self.mix = {"mixup": mixup, "cutmix": cutmix, "both": v2.RandomChoice([mixup, cutmix])}[kind]

    def __call__(self, samples: list) -> Any:
        inputs, labels = self.collate(samples)
        if self.prob == 0 or (self.prob < 1 and float(torch.rand(())) >= self.prob) or len(labels) < 2:
            return inputs, labels
        return self.mix(inputs, labels)


def check_mix(mix: dict[str, Any] | None, where: str = "data.mix") -> dict[str, Any] | None:
    """The `data.mix` setting with its defaults, or None for no mixing.

    Raises:
        ConfigError: an unknown kind or key, alpha <= 0, prob outside [0, 1].
    """
    if not mix:
        return None
    settings = {"kind": "mixup", "alpha": 1.0, "prob": 1.0, **mix}
    unknown = sorted(set(settings) - {"kind", "alpha", "prob"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: no such key (allowed: kind, alpha, prob)")
    if settings["kind"] not in KINDS:
        raise ConfigError(f"{where}.kind = {settings['kind']!r} is not allowed (allowed: {', '.join(KINDS)})")
    if not isinstance(settings["alpha"], (int, float)) or settings["alpha"] <= 0:
        raise ConfigError(f"{where}.alpha = {settings['alpha']!r} is not allowed (allowed: a number > 0, the Beta(alpha, alpha) concentration)")
    if not isinstance(settings["prob"], (int, float)) or not 0 <= settings["prob"] <= 1:
        raise ConfigError(f"{where}.prob = {settings['prob']!r} is not allowed (allowed: a probability in [0, 1])")
    return None if settings["kind"] == "none" else settings


def mix_loader(loader: DataLoader, settings: dict[str, Any], num_classes: int) -> DataLoader:
    """The same loader (dataset, sampler, batch size, workers) with mixing after collation."""
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler, num_workers=loader.num_workers,
                      collate_fn=MixCollate(loader.collate_fn, settings["kind"], float(settings["alpha"]), float(settings["prob"]), num_classes),
                      persistent_workers=loader.num_workers > 0)


def is_mixed(loader: Any) -> bool:
    """Whether a training loader mixes its batches (inputs differ every epoch)."""
    return isinstance(getattr(loader, "collate_fn", None), MixCollate)
