"""The task protocol and the one evaluation loop every task shares."""

from __future__ import annotations

from typing import Any, ClassVar, Iterable

import torch
from torch import Tensor, nn

from effitrain.batch import batch_size, forward, move
from effitrain.precision import PrecisionPolicy

DIRECTIONS = ("max", "min")


class Task:
    """Base class of tasks. Override `loss` and `score` (and `split`/`predict` where needed).

    Class attributes:
        metrics: every validation metric the task reports, with its direction ('max' or 'min');
            `trainer.monitor: val_<metric>` picks one for best checkpoints and early stopping.
        headline: the metric the ledger table shows first (e.g. 'accuracy').
    """

    metrics: ClassVar[dict[str, str]] = {"loss": "min"}
    headline: ClassVar[str] = "loss"

    @property
    def name(self) -> str:
        return type(self).__name__

    def split(self, batch: Any) -> tuple[Any, Any]:
        """(inputs, targets) of a batch as the loader yields it; targets may be None (no labels)."""
        inputs, targets = batch
        return inputs, targets

    def outputs(self, model: nn.Module, inputs: Any) -> Any:
        """The model's outputs on `inputs` (logits for classifiers)."""
        return forward(model, inputs)

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> Tensor:
        """The training loss of one batch (a scalar with gradients)."""
        raise NotImplementedError

    def score(self, outputs: Any, targets: Any) -> dict[str, float]:
        """Per-batch SUMS of every metric in `metrics` (the loop divides by the example count)."""
        raise NotImplementedError

    def predict(self, outputs: Any) -> list[int] | None:
        """Predicted labels to keep for churn (None: the task has no discrete predictions)."""
        return None

    def better(self, metric: str, value: float, best: float | None) -> bool:
        """Whether `value` of `metric` beats `best` (None: nothing yet)."""
        if best is None:
            return True
        return value > best if self.metrics[metric] == "max" else value < best

    def evaluate(self, model: nn.Module, loader: Iterable, precision: PrecisionPolicy, keep_predictions: bool = False) -> dict[str, Any]:
        """Mean of every metric over `loader`, in eval mode (the model's mode is restored).

        Returns:
            {metric: mean per example}, plus "labels" and "predictions" (lists, loader order)
            when `keep_predictions` and the task predicts labels.
        """
        sums, count, kept_labels, kept_predictions = self.totals(model, loader, precision, keep_predictions)
        scores: dict[str, Any] = {key: value / max(count, 1) for key, value in sums.items()}
        if keep_predictions and kept_predictions:
            scores.update(labels=kept_labels, predictions=kept_predictions)
        return scores

    @torch.no_grad()
    def totals(self, model: nn.Module, loader: Iterable, precision: PrecisionPolicy,
               keep_predictions: bool = False) -> tuple[dict[str, float], int, list[int], list[int]]:
        """Per-metric sums and the example count over `loader` (parts of a split scored on several
        processes add up to the whole split's), plus labels and predictions when asked."""
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {metric: 0.0 for metric in self.metrics}
        count = 0
        kept_labels: list[int] = []
        kept_predictions: list[int] = []
        for batch in loader:
            inputs, targets = self.split(batch)
            inputs, targets = move(inputs, precision.device), move(targets, precision.device)
            with precision.autocast():
                outputs = self.outputs(model, inputs)
            for key, value in self.score(outputs, targets).items():
                sums[key] = sums.get(key, 0.0) + value
            count += batch_size(inputs)
            if keep_predictions:
                predicted = self.predict(outputs)
                if predicted is not None:
                    kept_predictions += predicted
                    kept_labels += targets.tolist()
        model.train(was_training)
        return sums, count, kept_labels, kept_predictions
