"""`codistill`: online codistillation (Anil et al. 2018). N peers of one architecture train
together; each minimises cross-entropy plus `distill_weight` times the KL to the mean of the
other peers' predictions on its own batch, switched on after `burn_in_steps`. Besides
accuracy it reports prediction churn: the fraction of test examples on which peers disagree.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from effitrain.batch import forward
from effitrain.data.bundle import SeededShuffle
from effitrain.errors import ConfigError
from effitrain.measure import evaluate
from effitrain.predictions import churn, write_predictions
from effitrain.stages.base import Context
from effitrain.stages.train import TrainingStage, make_trainer
from effitrain.trainer import Hook


class Peers(nn.Module):
    """N models trained together; called on one batch, returns their mean logits (the ensemble)."""

    def __init__(self, peers: list[nn.Module]) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return torch.stack([forward(peer, kwargs if kwargs else args[0]) for peer in self.peers]).mean(dim=0)


class PeerBatches:
    """Zips one loader per peer (each with its own shuffle seed) into batches keyed by peer."""

    def __init__(self, loaders: list[DataLoader]) -> None:
        self.loaders = loaders
        self.sampler = self  # the trainer calls loader.sampler.set_epoch

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        for batches in zip(*self.loaders):
            yield ({f"peer_{i}": inputs for i, (inputs, _) in enumerate(batches)},
                   {f"peer_{i}": labels for i, (_, labels) in enumerate(batches)})


class CodistillLoss(nn.Module):
    """Σ_i CE(peer_i) + w · T² · KL(mean_{j≠i} softmax(peer_j / T) ‖ softmax(peer_i / T)), w = 0 during burn-in."""

    def __init__(self, weight: float, temperature: float, burn_in_steps: int) -> None:
        super().__init__()
        self.weight = weight
        self.temperature = temperature
        self.burn_in_steps = burn_in_steps
        self.step = 0

    def forward(self, model: Peers, inputs: Any, labels: Any) -> Tensor:  # type: ignore[override]
        peers = list(model.peers)
        shared = not (isinstance(labels, dict) and "peer_0" in labels)
        batches = [(inputs, labels)] * len(peers) if shared else [(inputs[f"peer_{i}"], labels[f"peer_{i}"]) for i in range(len(peers))]
        distilling = self.weight > 0 and self.step >= self.burn_in_steps
        shared_logits = [forward(peer, inputs) for peer in peers] if shared else None
        total: Tensor | None = None
        for i, (peer, (batch, batch_labels)) in enumerate(zip(peers, batches)):
            logits = (shared_logits[i] if shared_logits is not None else forward(peer, batch)).float()
            loss = F.cross_entropy(logits, batch_labels)
            if distilling:
                with torch.no_grad():
                    others = [
                        (shared_logits[j] if shared_logits is not None else forward(other, batch)).detach().float()
                        for j, other in enumerate(peers) if j != i
                    ]
                    target = torch.stack([F.softmax(o / self.temperature, dim=-1) for o in others]).mean(dim=0)
                soft = F.kl_div(F.log_softmax(logits / self.temperature, dim=-1), target, reduction="batchmean")
                loss = loss + self.weight * self.temperature**2 * soft
            total = loss if total is None else total + loss
        assert total is not None
        return total


class _TrackStep(Hook):
    """Tells the loss the trainer's optimizer step (for the burn-in)."""

    def __init__(self, loss: CodistillLoss) -> None:
        self.loss = loss

    def on_fit_start(self, trainer: Any) -> None:
        self.loss.step = trainer.step

    def after_step(self, trainer: Any) -> None:
        self.loss.step = trainer.step


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
    `peer_accuracy` and `churn` (mean over peer pairs of the test-prediction churn).
    """

    kind = "codistill"
    peers: int = 2
    distill_weight: float = 1.0
    temperature: float = 1.0
    burn_in_steps: int = 0
    same_data_order: bool = False

    def __post_init__(self) -> None:
        if self.peers < 2:
            raise ConfigError(f"peers = {self.peers} is not allowed (allowed: an integer >= 2)")
        if self.distill_weight < 0:
            raise ConfigError(f"distill_weight = {self.distill_weight} is not allowed (allowed: a number >= 0)")
        if self.temperature <= 0:
            raise ConfigError(f"temperature = {self.temperature} is not allowed (allowed: a number > 0)")
        if self.burn_in_steps < 0:
            raise ConfigError(f"burn_in_steps = {self.burn_in_steps} is not allowed (allowed: an integer >= 0)")

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        peers = []
        for index in range(self.peers):
            torch.manual_seed(ctx.cfg.seed + index)
            peers.append(ctx.build_model())
        self._peers = Peers(peers).to(ctx.device)
        return peers[0]

    def run(self, name: str, model: nn.Module, ctx: Context) -> nn.Module:
        group = self._peers
        loss = CodistillLoss(self.distill_weight, self.temperature, self.burn_in_steps)
        train: Any = ctx.data.train
        if not self.same_data_order:
            seed = train.sampler.seed if isinstance(train.sampler, SeededShuffle) else ctx.cfg.seed
            train = PeerBatches([
                DataLoader(train.dataset, batch_size=train.batch_size, sampler=SeededShuffle(len(train.dataset), seed + 7919 * i),
                           collate_fn=train.collate_fn, num_workers=train.num_workers)
                for i in range(self.peers)
            ])
        trainer = make_trainer(ctx, name, self._overrides(), loss_fn=loss, hooks=[_TrackStep(loss)])
        result = trainer.fit(group, train, ctx.data.val, resume=ctx.resume)
        scores = [evaluate(peer, ctx.data.test, ctx.precision, keep_predictions=True) for peer in group.peers]
        folder = ctx.run_dir / "predictions"
        for index, score in enumerate(scores):
            write_predictions(folder / f"{name}_peer{index}.json", score["labels"], score["predictions"])
        pairs = list(itertools.combinations(range(self.peers), 2))
        ctx.extra.update({
            "epochs": result.epochs,
            "steps": result.steps,
            "peer_accuracy": [score["accuracy"] for score in scores],
            "ensemble_accuracy": evaluate(group, ctx.data.test, ctx.precision)["accuracy"],
            "churn": sum(churn(scores[i]["predictions"], scores[j]["predictions"]) for i, j in pairs) / len(pairs),
        })
        return group.peers[0]
