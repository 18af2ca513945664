"""Tasks: what a batch is, the training loss, and the validation metrics (with directions).

The trainer, evaluation, measurement and the ledger go through a `Task`, so a regression,
self-supervised or masked-LM stage plugs in with `task._target_=your.Task` and no trainer edits.
"""

from effitrain.tasks.base import Task
from effitrain.tasks.classification import Classification

__all__ = ["Classification", "Task"]
