"""The one training loop. Distillation, gradual pruning and QAT reuse it through a loss
function and per-step hooks instead of copying it; a `Task` says what a batch is."""

from effitrain.config.schema import TrainerConfig
from effitrain.trainer.hooks import Hook
from effitrain.trainer.loop import FitResult, Trainer

__all__ = ["FitResult", "Hook", "Trainer", "TrainerConfig"]
