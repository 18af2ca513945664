"""What a user writes outside effitrain: a regression task, a new stage kind, their own model
class and data builder. The tests run them through the real CLI (no edit of effitrain)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from effitrain.batch import forward
from effitrain.data import DataBundle, make_bundle, split_indices
from effitrain.errors import require
from effitrain.stages import Context, Prepared, Stage, StageResult
from effitrain.tasks import Task


class Regression(Task):
    """Real-valued targets: mean squared error trains; mse and mae (both lower is better) score."""

    metrics: ClassVar[dict[str, str]] = {"mse": "min", "mae": "min"}
    headline: ClassVar[str] = "mse"

    def loss(self, model: nn.Module, inputs: Any, targets: Tensor) -> Tensor:
        return F.mse_loss(forward(model, inputs).squeeze(-1), targets)

    def score(self, outputs: Tensor, targets: Tensor) -> dict[str, float]:
        error = outputs.squeeze(-1).float() - targets
        return {"mse": (error**2).sum().item(), "mae": error.abs().sum().item()}


def build_regression(num_samples: int = 400, features: int = 8, noise: float = 0.1, batch_size: int = 32, seed: int = 0) -> DataBundle:
    """y = x·w + noise, with a seeded w."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, features, generator=generator)
    targets = inputs @ torch.randn(features, generator=generator) + noise * torch.randn(num_samples, generator=generator)
    bins = (targets > targets.median()).long().tolist()  # split stratified by a coarse bin
    train, val, test = (TensorDataset(inputs[index], targets[index]) for index in split_indices(bins, 0.15, 0.15, seed))
    return make_bundle(train, val, test, num_classes=1, input_shape=(features,), batch_size=batch_size,
                       eval_batch_size=128, num_workers=0, shuffle_seed=seed)


class TinyNet(nn.Module):
    """A user's model that takes only its own arguments (no input_shape)."""

    def __init__(self, num_classes: int, width: int, in_features: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.layers(inputs)


@dataclass
class Shrink(Stage):
    """A new stage kind: multiply every Linear weight by `factor` (a crude regulariser)."""

    kind = "shrink"
    factor: float = 0.5

    def __post_init__(self) -> None:
        require(0 < self.factor <= 1, "factor", self.factor, "a number in (0, 1]")

    def run(self, name: str, prepared: Prepared, ctx: Context) -> StageResult:
        layers = [module for module in prepared.model.modules() if isinstance(module, nn.Linear)]
        with torch.no_grad():
            for layer in layers:
                layer.weight.mul_(self.factor)
        return StageResult(prepared.model, {"shrunk_layers": len(layers), "factor": self.factor})


@dataclass
class Fault(Stage):
    """A stage that goes wrong on one process of a multi-process run: `how` is error (a
    ConfigError a user can act on), crash (a plain RuntimeError) or hang (stops answering)."""

    kind = "fault"
    rank: int = 1
    how: str = "error"

    def run(self, name: str, prepared: Prepared, ctx: Context) -> StageResult:
        import time

        from effitrain.errors import ConfigError
        from effitrain.parallel.world import barrier, current

        if current().rank == self.rank:
            if self.how == "error":
                raise ConfigError(f"stage.{name}: process {self.rank} refuses on purpose")
            if self.how == "crash":
                raise RuntimeError(f"process {self.rank} crashed on purpose")
            time.sleep(3600)
        barrier()  # the others wait for the faulty one, as a collective in training would
        return StageResult(prepared.model)


class ConvHeadNet(nn.Module):
    """A user's model whose classifier is a 1x1 convolution (no Linear, nothing named classifier/fc/head)."""

    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.scores = nn.Conv2d(width, num_classes, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.scores(self.body(inputs)).mean(dim=(2, 3))
