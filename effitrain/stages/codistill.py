"""`codistill`: online codistillation (Anil et al. 2018; the algorithm is in
`effitrain.distill.codistill`). Besides accuracy the row reports prediction churn: the fraction
of test examples on which peers disagree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING, DictConfig

from effitrain.data.bundle import SeededShuffle
from effitrain.distill.codistill import CodistillLoss, PeerBatches, Peers, TrackStep, mean_churn
from effitrain.errors import require
from effitrain.predictions import write_predictions
from effitrain.stages.base import Context, Prepared, StageResult
from effitrain.stages.train import PlannedFit, TrainingStage, make_trainer


@dataclass
class PreparedPeers(Prepared):
    """Peer 0 is `model`; all peers, built from seeds seed, seed+1, …"""

    peers: Peers


@dataclass
class Codistill(TrainingStage):
    """Train `peers` copies of the model together, each distilling from the others.

    Fields:
        peers: number of peers N >= 2 (same architecture, initialised from seeds seed, seed+1, …).
        distill_weight: w >= 0; 0 trains the peers independently (the churn baseline).
        temperature: softening temperature T > 0.
        burn_in_steps: optimizer steps of plain cross-entropy before distillation starts.
        same_data_order: all peers see the same batches (cheaper: one forward per peer); false
            gives each peer its own shuffle (then each peer's batch is also run through the others).
    The stage's model (handed on, measured in the ledger row) is peer 0; the row also has
    `peer_accuracy`, `ensemble_accuracy` and `churn` (mean over peer pairs of the test-prediction churn).
    """

    kind = "codistill"
    peers: int = MISSING
    distill_weight: float = MISSING
    temperature: float = MISSING
    burn_in_steps: int = MISSING
    same_data_order: bool = MISSING

    def __post_init__(self) -> None:
        require(self.peers >= 2, "peers", self.peers, "an integer >= 2")
        require(self.distill_weight >= 0, "distill_weight", self.distill_weight, "a number >= 0")
        require(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        require(self.burn_in_steps >= 0, "burn_in_steps", self.burn_in_steps, "an integer >= 0")

    def prepare(self, model: Any, ctx: Context) -> PreparedPeers:
        peers = []
        for index in range(self.peers):
            torch.manual_seed(ctx.cfg.seed + index)
            peers.append(ctx.build_model())
        return PreparedPeers(peers[0], Peers(peers).to(ctx.device))

    def planned(self, name: str, cfg: DictConfig, batches: int) -> list[PlannedFit]:
        fits = super().planned(name, cfg, batches)
        loss = CodistillLoss(self.distill_weight, self.temperature, self.burn_in_steps)
        for fit in fits:
            fit.values["kd_weight"] = [loss.weight_at(step) for step in range(len(fit.lr))]
        return fits

    def run(self, name: str, prepared: PreparedPeers, ctx: Context) -> StageResult:  # type: ignore[override]
        group = prepared.peers
        loss = CodistillLoss(self.distill_weight, self.temperature, self.burn_in_steps)
        train: Any = ctx.data.train
        if not self.same_data_order:
            seed = train.sampler.seed if isinstance(train.sampler, SeededShuffle) else ctx.cfg.seed
            train = PeerBatches(train, self.peers, seed)
        trainer = make_trainer(ctx, name, self.training_overrides(), loss_fn=loss, hooks=[TrackStep(loss)])
        result = trainer.fit(group, train, ctx.data.val, resume=ctx.resume)
        scores = [ctx.task.evaluate(peer, ctx.data.test, ctx.precision, keep_predictions=True) for peer in group.peers]
        for index, score in enumerate(scores):
            write_predictions(ctx.run_dir / "predictions" / f"{name}_peer{index}.json", score["labels"], score["predictions"])
        return StageResult(group.peers[0], {
            "epochs": result.epochs,
            "steps": result.steps,
            "peer_accuracy": [score["accuracy"] for score in scores],
            "ensemble_accuracy": ctx.task.evaluate(group, ctx.data.test, ctx.precision)["accuracy"],
            "churn": mean_churn([score["predictions"] for score in scores]),
        })
