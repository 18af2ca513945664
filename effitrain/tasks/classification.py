"""Classification: (inputs, labels) batches, cross-entropy, accuracy. effitrain's default task."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from effitrain.batch import forward
from effitrain.tasks.base import Task


class Classification(Task):
    """Logits against integer labels: loss is cross-entropy, accuracy the headline."""

    metrics: ClassVar[dict[str, str]] = {"loss": "min", "accuracy": "max"}
    headline: ClassVar[str] = "accuracy"

    def loss(self, model: nn.Module, inputs: Any, targets: Tensor) -> Tensor:
        return F.cross_entropy(forward(model, inputs), targets)

    def score(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        return {
            "loss": F.cross_entropy(outputs.float(), targets, reduction="sum").item(),
            "accuracy": (outputs.argmax(dim=-1) == targets).sum().item(),
        }

    def predict(self, outputs: Tensor) -> list[int]:
        return outputs.argmax(dim=-1).tolist()
