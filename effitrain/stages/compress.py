"""`lowrank` and `cluster` stages: factorise or weight-share the layers, then (optionally)
fine-tune with the one trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from torch import nn

from effitrain.checkpoint import load_weights, saved_shapes
from effitrain.compress import lowrank
from effitrain.compress.cluster import ClusteredWeight
from effitrain.errors import ConfigError
from effitrain.quant.modules import replace_layers, select_layers
from effitrain.stages.base import Context, FromSource
from effitrain.stages.train import TrainingStage, make_trainer


@dataclass
class LowRank(FromSource, TrainingStage):
    """Truncated-SVD factorisation of Linear and 1x1 Conv layers.

    Fields:
        rank_ratio: rank as a fraction of each layer's full rank, in (0, 1]; or
        energy: keep the smallest rank holding this fraction of Σ s², in (0, 1].
        skip: module-name patterns left whole (e.g. the logits layer).
        fine_tune: train afterwards (epochs: this stage's trainer).
    """

    kind = "lowrank"
    rank_ratio: Optional[float] = 0.25
    energy: Optional[float] = None
    skip: List[str] = field(default_factory=list)
    fine_tune: bool = True

    def __post_init__(self) -> None:
        if (self.rank_ratio is None) == (self.energy is None):
            raise ConfigError("rank_ratio / energy: give exactly one (allowed: rank_ratio in (0, 1], or energy in (0, 1])")
        for key in ("rank_ratio", "energy"):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 1:
                raise ConfigError(f"{key} = {value} is not allowed (allowed: a number in (0, 1])")

    def run(self, name: str, model: nn.Module, ctx: Context) -> nn.Module:
        names = select_layers(model, self.skip, f"stage.{name}.skip", types=(nn.Linear, nn.Conv2d))
        modules = dict(model.named_modules())
        names = [layer for layer in names if lowrank.factorizable(modules[layer])]
        ranks = lowrank.plan(model, names, self.rank_ratio, self.energy)
        lowrank.apply(model, ranks)
        if self.fine_tune:
            make_trainer(ctx, name, self._overrides()).fit(model, ctx.data.train, ctx.data.val, resume=ctx.resume)
        ctx.extra["factorised"] = {layer: rank for layer, rank in ranks.items()}
        return model

    def load_model(self, model: nn.Module, path: Path) -> nn.Module:
        ranks = {key[: -len(".0.weight")]: shape[0] for key, shape in saved_shapes(path).items() if key.endswith(".0.weight")}
        modules = dict(model.named_modules())
        lowrank.apply(model, {layer: rank for layer, rank in ranks.items() if layer in modules and lowrank.factorizable(modules[layer])})
        return load_weights(model, path)


@dataclass
class Cluster(FromSource, TrainingStage):
    """k-means weight sharing per layer (codebook + indices), optionally fine-tuning the centroids.

    Fields:
        clusters: k centroids per layer, in [2, 256] (k <= 16 stores 4-bit indices).
        skip: module-name patterns left whole.
        fine_tune: train the codebooks (and the other parameters) afterwards.
    """

    kind = "cluster"
    clusters: int = 16
    skip: List[str] = field(default_factory=list)
    fine_tune: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.clusters <= 256:
            raise ConfigError(f"clusters = {self.clusters} is not allowed (allowed: an integer in [2, 256])")

    def _cluster(self, model: nn.Module, where: str, seed: int) -> None:
        names = select_layers(model, self.skip, where, types=(nn.Linear, nn.Conv1d, nn.Conv2d))
        replace_layers(model, names, lambda layer: ClusteredWeight(layer, self.clusters, seed))

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        self._seed = ctx.cfg.seed
        return super().prepare(model, ctx)

    def run(self, name: str, model: nn.Module, ctx: Context) -> nn.Module:
        self._cluster(model, f"stage.{name}.skip", ctx.cfg.seed)
        if self.fine_tune:
            make_trainer(ctx, name, self._overrides()).fit(model, ctx.data.train, ctx.data.val, resume=ctx.resume)
        ctx.extra["clusters"] = self.clusters
        return model

    def load_model(self, model: nn.Module, path: Path) -> nn.Module:
        self._cluster(model, "skip", self._seed)  # the structure; the saved codebooks and indices replace the values
        return load_weights(model, path)
