"""`lowrank` and `cluster` stages: factorise or weight-share the layers, then (optionally)
fine-tune with the one trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING
from torch import nn

from effitrain.checkpoint import load_weights, saved_shapes
from effitrain.compress import lowrank
from effitrain.compress.cluster import ClusteredWeight
from effitrain.errors import ConfigError, require
from effitrain.layers import replace_layers, select_layers
from effitrain.stages.base import Context, FromSource, Prepared, StageResult, Stored
from effitrain.stages.train import TrainingStage, make_trainer

CLUSTERABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


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
    rank_ratio: Optional[float] = MISSING
    energy: Optional[float] = MISSING
    skip: List[str] = MISSING
    fine_tune: bool = MISSING

    def __post_init__(self) -> None:
        if (self.rank_ratio is None) == (self.energy is None):
            raise ConfigError("rank_ratio / energy: give exactly one (allowed: rank_ratio in (0, 1], or energy in (0, 1])")
        for key in ("rank_ratio", "energy"):
            value = getattr(self, key)
            if value is not None:
                require(0 < value <= 1, key, value, "a number in (0, 1]")

    def run(self, name: str, prepared: Prepared, ctx: Context) -> StageResult:
        model = prepared.model
        names = select_layers(model, self.skip, f"stage.{name}.skip", (nn.Linear, nn.Conv2d), "factorise")
        modules = dict(model.named_modules())
        names = [layer for layer in names if lowrank.factorizable(modules[layer])]
        ranks = lowrank.plan(model, names, self.rank_ratio, self.energy)
        lowrank.apply(model, ranks)
        if self.fine_tune:
            make_trainer(ctx, name, self.training_overrides()).fit(model, ctx.data.train, ctx.data.val, resume=ctx.resume)
        return StageResult(model, {"factorised": dict(ranks)})

    def load_model(self, prepared: Prepared, path: Path) -> nn.Module:
        model = prepared.model
        ranks = {key[: -len(".0.weight")]: shape[0] for key, shape in saved_shapes(path).items() if key.endswith(".0.weight")}
        modules = dict(model.named_modules())
        lowrank.apply(model, {layer: rank for layer, rank in ranks.items() if layer in modules and lowrank.factorizable(modules[layer])})
        return load_weights(model, path)


@dataclass
class PreparedCluster(Prepared):
    """The model to cluster and the k-means seed (the run's seed)."""

    seed: int


@dataclass
class Cluster(FromSource, Stored, TrainingStage):
    """k-means weight sharing per layer (codebook + indices), optionally fine-tuning the centroids.

    Fields:
        clusters: k centroids per layer, in [2, 256] (k <= 16 stores 4-bit indices).
        skip: module-name patterns left whole.
        fine_tune: train the codebooks (and the other parameters) afterwards.
        storage: auto | compressed | plain (see `Stored`): the indices, without the zeros of
            pruned weights, zstd-compressed.
    """

    kind = "cluster"
    clusters: int = MISSING
    skip: List[str] = MISSING
    fine_tune: bool = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        require(2 <= self.clusters <= 256, "clusters", self.clusters, "an integer in [2, 256]")

    def _cluster(self, model: nn.Module, where: str, seed: int) -> None:
        names = select_layers(model, self.skip, where, CLUSTERABLE, "cluster")
        replace_layers(model, names, lambda layer: ClusteredWeight(layer, self.clusters, seed))

    def prepare(self, model: nn.Module, ctx: Context) -> PreparedCluster:
        return PreparedCluster(self.starting_model(model, ctx), ctx.cfg.seed)

    def run(self, name: str, prepared: PreparedCluster, ctx: Context) -> StageResult:  # type: ignore[override]
        model = prepared.model
        self._cluster(model, f"stage.{name}.skip", prepared.seed)
        if self.fine_tune:
            make_trainer(ctx, name, self.training_overrides()).fit(model, ctx.data.train, ctx.data.val, resume=ctx.resume)
        return StageResult(model, {"clusters": self.clusters})

    def load_model(self, prepared: PreparedCluster, path: Path) -> nn.Module:  # type: ignore[override]
        self._cluster(prepared.model, "skip", prepared.seed)  # the structure; the saved codebooks and indices replace the values
        return load_weights(prepared.model, path)
