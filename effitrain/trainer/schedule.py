"""Learning-rate schedules as multipliers of the peak rate: linear warm-up, then cosine,
linear or constant, over the run's optimizer steps. `cosine`, `linear` and `constant` are the
`_target_`s of conf/scheduler/ (the trainer calls them with the optimizer and total_steps)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Factor of the peak lr at optimizer step `step` (0-based).

    Args:
        step: optimizer steps done so far.
        name: cosine, linear or constant.
        warmup_steps: steps of linear warm-up from 0 to the peak.
        total_steps: steps in the whole run.
        min_lr_ratio: the final factor for cosine and linear decay.

    Returns:
        The multiplier in [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(optimizer: Optimizer, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> LambdaLR:
    """A LambdaLR applying `lr_multiplier` to every parameter group's peak rate."""
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, name, warmup_steps, total_steps, min_lr_ratio))


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> LambdaLR:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak at `total_steps`."""
    return build_scheduler(optimizer, "cosine", warmup_steps, total_steps, min_lr_ratio)


def linear(optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> LambdaLR:
    """Linear warm-up, then linear decay to `min_lr_ratio` of the peak at `total_steps`."""
    return build_scheduler(optimizer, "linear", warmup_steps, total_steps, min_lr_ratio)


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> LambdaLR:
    """Linear warm-up, then the peak rate (`min_lr_ratio` is unused)."""
    return build_scheduler(optimizer, "constant", warmup_steps, total_steps, min_lr_ratio)
