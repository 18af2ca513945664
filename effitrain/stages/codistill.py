"""`codistill`: online codistillation (Anil et al. 2018; the algorithm is in
`effitrain.distill.codistill`). Besides accuracy the row reports prediction churn: the fraction
of test examples on which peers disagree."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import MISSING, DictConfig

from effitrain.data.bundle import SeededShuffle
from effitrain.distill.codistill import (
    EXCHANGES,
    PLACEMENTS,
    CodistillLoss,
    ExchangeLoss,
    ExchangeWeights,
    PeerBatches,
    Peers,
    TrackStep,
    mean_churn,
)
from effitrain.errors import ConfigError, require, require_choice
from effitrain.parallel import world as parallel
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
        placement: together (every process holds every peer; several processes split each
            batch, DDP) | per_rank (each peer trains on its own processes: trainer.devices must be
            a multiple of `peers`; the peers exchange through torch.distributed, as in the paper).
        exchange: per_rank: predictions (every step each process's batch goes through every
            peer) | checkpoints (local copies of the other peers, refreshed every `exchange_every` steps).
        exchange_every: per_rank with checkpoints: steps between weight exchanges.
    The stage's model (handed on, measured in the ledger row) is peer 0; the row also has
    `peer_accuracy`, `ensemble_accuracy` and `churn` (mean over peer pairs of the test-prediction churn).
    """

    kind = "codistill"
    peers: int = MISSING
    distill_weight: float = MISSING
    temperature: float = MISSING
    burn_in_steps: int = MISSING
    same_data_order: bool = MISSING
    placement: str = "together"  # defaults here as in the YAML, for run folders made before these fields
    exchange: str = "predictions"
    exchange_every: int = 50

    def __post_init__(self) -> None:
        require(self.peers >= 2, "peers", self.peers, "an integer >= 2")
        require(self.distill_weight >= 0, "distill_weight", self.distill_weight, "a number >= 0")
        require(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        require(self.burn_in_steps >= 0, "burn_in_steps", self.burn_in_steps, "an integer >= 0")
        require_choice("placement", self.placement, PLACEMENTS)
        require_choice("exchange", self.exchange, EXCHANGES)
        require(self.exchange_every >= 1, "exchange_every", self.exchange_every, "an integer >= 1")

    def check(self, cfg: DictConfig, name: str) -> None:
        super().check(cfg, name)
        if self.placement == "per_rank":
            world = parallel.current()
            processes = world.size if world.distributed else int(cfg.trainer.devices)
            self.check_processes(processes, f"stage.{name}")

    def check_processes(self, processes: int, where: str) -> None:
        if processes < self.peers or processes % self.peers:
            raise ConfigError(f"{where}.placement = 'per_rank' puts each of {self.peers} peers on its own processes, and the run has "
                              f"{processes} (allowed: trainer.devices = a multiple of {self.peers}, or placement=together)")

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
        if self.placement == "per_rank":
            return self.run_per_rank(name, prepared, ctx)
        group = prepared.peers
        loss = CodistillLoss(self.distill_weight, self.temperature, self.burn_in_steps)
        train: Any = ctx.data.train
        if not self.same_data_order:
            train = PeerBatches(train, self.peers, self._seed(ctx))
        trainer = make_trainer(ctx, name, self.training_overrides(), loss_fn=loss, hooks=[TrackStep(loss)])
        result = trainer.fit(group, train, ctx.data.val, resume=ctx.resume)
        return StageResult(group.peers[0], {"epochs": result.epochs, "steps": result.steps, **self.scores(name, group, ctx)})

    def _seed(self, ctx: Context) -> int:
        sampler = getattr(ctx.data.train, "sampler", None)
        return sampler.seed if isinstance(sampler, SeededShuffle) else ctx.cfg.seed

    def scores(self, name: str, group: Peers, ctx: Context) -> dict[str, Any]:
        """Peer and ensemble test accuracy and churn; each peer's predictions saved (rank 0)."""
        scores = [ctx.task.evaluate(peer, ctx.data.test, ctx.precision, keep_predictions=True) for peer in group.peers]
        if ctx.main:
            for index, score in enumerate(scores):
                write_predictions(ctx.run_dir / "predictions" / f"{name}_peer{index}.json", score["labels"], score["predictions"])
        return {
            "peer_accuracy": [score["accuracy"] for score in scores],
            "ensemble_accuracy": ctx.task.evaluate(group, ctx.data.test, ctx.precision)["accuracy"],
            "churn": mean_churn([score["predictions"] for score in scores]),
        }

    def run_per_rank(self, name: str, prepared: PreparedPeers, ctx: Context) -> StageResult:
        """Each peer on its own processes (`trainer.devices / peers` each, DDP among them), its own
        data order, exchanging with the others through torch.distributed; peer p's checkpoints
        in checkpoints/NAME/peer<p>/. Rank 0 gathers the trained peers for the row; every
        process hands on peer 0."""
        world = parallel.current()
        self.check_processes(world.size, f"stage.{name}")
        peer, group = parallel.split(self.peers)
        peers = prepared.peers.peers
        leaders = [index * (world.size // self.peers) for index in range(self.peers)]
        copies = None
        if self.exchange == "checkpoints":
            copies = [copy.deepcopy(model) for model in peers]
        loss = ExchangeLoss(self.distill_weight, self.temperature, self.burn_in_steps, peer, leaders, self.exchange, copies)
        hooks: list[Any] = [TrackStep(loss)]  # type: ignore[arg-type]
        if copies is not None:
            hooks.append(ExchangeWeights(loss, self.exchange_every))
        train: Any = ctx.data.train
        if not self.same_data_order:  # the same orders as `together` gives its peers
            train = PeerBatches(train, self.peers, self._seed(ctx)).loaders[peer]
        trainer = make_trainer(ctx, name, self.training_overrides(), loss_fn=loss, hooks=hooks, group=group,
                               checkpoint_name=f"{name}/peer{peer}", label=f"peer {peer}")
        result = trainer.fit(peers[peer], train, ctx.data.val, resume=ctx.resume)
        states = parallel.gather_objects({key: value.cpu() for key, value in peers[peer].state_dict().items()} if group.leader else None)
        metrics: dict[str, Any] = {"epochs": result.epochs, "steps": result.steps, "placement": f"per_rank ({world.size // self.peers} process(es) per peer, exchange: {self.exchange})"}
        if states is not None:  # rank 0: every peer as trained, for the row
            for model, state in zip(peers, [states[leader] for leader in leaders]):
                model.load_state_dict(state)
            metrics.update(self.scores(name, prepared.peers, ctx))
        parallel.broadcast_module(peers[0], source=0)  # every process hands on peer 0
        return StageResult(peers[0], metrics)
