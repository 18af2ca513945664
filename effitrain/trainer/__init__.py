"""The one training loop. Distillation, gradual pruning and QAT reuse it through a loss
function and per-step hooks instead of copying it."""

from effitrain.trainer.hooks import Hook
from effitrain.trainer.loop import FitResult, Trainer, TrainerSettings, cross_entropy_loss

__all__ = ["FitResult", "Hook", "Trainer", "TrainerSettings", "cross_entropy_loss"]
