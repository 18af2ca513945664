"""Online codistillation (Anil et al. 2018): N peers of one architecture train together; each
minimises cross-entropy plus `weight` times the KL to the mean of the other peers' predictions
on its own batch, switched on after `burn_in_steps`. Peers may each see their own data order.

Two placements. `CodistillLoss` holds every peer in one module (one process, or replicated on
every process by DDP). `ExchangeLoss` is one peer's loss when each peer trains on its own
process (or group of processes), as in the paper: the peers exchange their predictions on each
other's batches every step, or copies of their weights every `exchange_every` steps (the
paper's stale checkpoints), through torch.distributed collectives.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from effitrain.batch import forward, move
from effitrain.data.bundle import SeededShuffle
from effitrain.parallel.batches import GlobalBatches, Step
from effitrain.parallel.world import all_gather_objects, broadcast_module
from effitrain.predictions import churn
from effitrain.trainer import Hook


class Peers(nn.Module):
    """N models trained together; called on one batch, returns their mean logits (the ensemble)."""

    def __init__(self, peers: list[nn.Module]) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return torch.stack([forward(peer, kwargs if kwargs else args[0]) for peer in self.peers]).mean(dim=0)


class PeerBatches:
    """One loader per peer, each with its own shuffle seed, zipped into batches keyed by peer.

    Like a loader with a `SeededShuffle` sampler, its order depends only on (seed, epoch):
    the trainer calls `set_epoch` before each epoch.
    """

    def __init__(self, loader: DataLoader, peers: int, seed: int) -> None:
        self.loaders = [
            DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=SeededShuffle(len(loader.dataset), seed + 7919 * index),  # type: ignore[arg-type]
                       collate_fn=loader.collate_fn, num_workers=loader.num_workers)
            for index in range(peers)
        ]

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        for batches in zip(*self.loaders):
            yield _keyed(batches)

    def step_batches(self, rank: int, world: int, accum: int) -> "PeerSteps":
        """The trainer's steps on process `rank` of `world` (see effitrain.parallel.batches):
        every peer's global batch split the same way."""
        return PeerSteps([GlobalBatches(loader, rank, world, accum) for loader in self.loaders])


def _keyed(batches: Any) -> tuple[dict, dict]:
    return ({f"peer_{i}": inputs for i, (inputs, _) in enumerate(batches)},
            {f"peer_{i}": labels for i, (_, labels) in enumerate(batches)})


class PeerSteps:
    """Optimizer steps of `PeerBatches`: each micro-batch carries every peer's own examples."""

    def __init__(self, steps: list[GlobalBatches]) -> None:
        self.steps = steps

    def set_epoch(self, epoch: int) -> None:
        for steps in self.steps:
            steps.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.steps[0])

    def __iter__(self) -> Iterator[Step]:
        for steps in zip(*self.steps):
            yield Step([_keyed(batches) for batches in zip(*(step.batches for step in steps))], steps[0].sizes, steps[0].total)


class CodistillLoss(nn.Module):
    """Σ_i CE(peer_i) + w · T² · KL(mean_{j≠i} softmax(peer_j / T) ‖ softmax(peer_i / T)), w = 0 during burn-in."""

    def __init__(self, weight: float, temperature: float, burn_in_steps: int) -> None:
        super().__init__()
        self.weight = weight
        self.temperature = temperature
        self.burn_in_steps = burn_in_steps
        self.step = 0

    def weight_at(self, step: int) -> float:
        """The distillation weight of the optimizer step that starts after `step` steps (0 during burn-in)."""
        return self.weight if step >= self.burn_in_steps else 0.0

    def logged(self, trainer: Any) -> dict[str, float]:
        """The KD weight the step just done trained with."""
        return {"kd_weight": self.weight_at(trainer.step - 1)}

    def forward(self, model: Peers, inputs: Any, labels: Any) -> Tensor:  # type: ignore[override]
        peers = list(model.peers)
        shared = not (isinstance(labels, dict) and "peer_0" in labels)
        batches = [(inputs, labels)] * len(peers) if shared else [(inputs[f"peer_{i}"], labels[f"peer_{i}"]) for i in range(len(peers))]
        distilling = self.weight_at(self.step) > 0
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


class TrackStep(Hook):
    """Tells the loss the trainer's optimizer step (for the burn-in)."""

    def __init__(self, loss: CodistillLoss) -> None:
        self.loss = loss

    def on_fit_start(self, trainer: Any) -> None:
        self.loss.step = trainer.step

    def after_step(self, trainer: Any) -> None:
        self.loss.step = trainer.step


def mean_churn(predictions: list[list[int]]) -> float:
    """Mean over peer pairs of the fraction of examples the two label differently."""
    pairs = list(itertools.combinations(range(len(predictions)), 2))
    return sum(churn(predictions[i], predictions[j]) for i, j in pairs) / len(pairs)


PLACEMENTS = ("together", "per_rank")
EXCHANGES = ("predictions", "checkpoints")


class ExchangeLoss(nn.Module):
    """One peer's loss when every peer trains on its own processes: CE on this process's batch +
    w · T² · KL(mean of the other peers' softened predictions on this batch ‖ this peer's).

    Args:
        weight, temperature, burn_in_steps: as for `CodistillLoss`.
        peer: this process's peer; leaders: the global rank of each peer's first process.
        exchange: 'predictions' (every step the processes swap their batches and each peer's
            predictions on them) or 'checkpoints' (the other peers' predictions come from local
            copies of their weights, refreshed every `exchange_every` steps by `ExchangeWeights`).
        copies: for 'checkpoints', one model per peer (this peer's slot unused), never trained.
    """

    def __init__(self, weight: float, temperature: float, burn_in_steps: int, peer: int, leaders: list[int], exchange: str,
                 copies: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.weight, self.temperature, self.burn_in_steps = weight, temperature, burn_in_steps
        self.peer, self.leaders, self.exchange = peer, leaders, exchange
        self._copies = copies or []  # a plain list: neither trained nor synchronised by DDP
        for copy in self._copies:
            copy.eval()
            copy.requires_grad_(False)
        self.step = 0

    weight_at = CodistillLoss.weight_at
    logged = CodistillLoss.logged

    def forward(self, model: nn.Module, inputs: Any, labels: Tensor) -> Tensor:  # type: ignore[override]
        logits = forward(model, inputs).float()
        loss = F.cross_entropy(logits, labels)
        if self.weight_at(self.step) == 0:  # the same on every process: none of them exchanges
            return loss
        others = self._swapped(model, inputs, logits) if self.exchange == "predictions" else self._from_copies(inputs)
        with torch.no_grad():
            target = torch.stack([F.softmax(other.float() / self.temperature, dim=-1) for other in others]).mean(dim=0)
        soft = F.kl_div(F.log_softmax(logits / self.temperature, dim=-1), target, reduction="batchmean")
        return loss + self.weight * self.temperature**2 * soft

    def _swapped(self, model: nn.Module, inputs: Any, logits: Tensor) -> list[Tensor]:
        """Every process's batch goes to every process; each runs its peer on all of them; each
        gets back the other peers' predictions on its own batch."""
        device = logits.device
        batches = all_gather_objects(move(inputs, torch.device("cpu")))
        mine = _rank()  # gathered in global rank order
        with torch.no_grad():
            outputs = [logits.detach().cpu() if index == mine else forward(model, move(batch, device)).float().cpu()
                       for index, batch in enumerate(batches)]
        table = all_gather_objects(outputs)  # table[process][batch] = that process's peer on that batch
        return [table[leader][mine].to(device) for peer, leader in enumerate(self.leaders) if peer != self.peer]

    def _from_copies(self, inputs: Any) -> list[Tensor]:
        with torch.no_grad():
            return [forward(copy, inputs).float() for peer, copy in enumerate(self._copies) if peer != self.peer]

    def refresh(self, model: nn.Module) -> None:
        """Every peer's current weights into every process's copies (each peer's leader is the source)."""
        for peer, (copy, leader) in enumerate(zip(self._copies, self.leaders)):
            if peer == self.peer:
                copy.load_state_dict(model.state_dict())
            broadcast_module(copy, source=leader)

    def copies_state(self) -> list[dict[str, Tensor]]:
        return [{name: tensor.cpu() for name, tensor in copy.state_dict().items()} for copy in self._copies]

    def load_copies(self, states: list[dict[str, Tensor]]) -> None:
        for copy, state in zip(self._copies, states):
            copy.load_state_dict(state)


def _rank() -> int:
    from effitrain.parallel.world import current

    return current().rank


class ExchangeWeights(Hook):
    """`exchange: checkpoints`: refresh the peers' copies at the start and every `every` steps;
    the copies are this hook's checkpoint state, so a resumed run distils from the same ones."""

    def __init__(self, loss: ExchangeLoss, every: int) -> None:
        self.loss = loss
        self.every = every
        self.restored = False

    def on_fit_start(self, trainer: Any) -> None:
        if not self.restored:
            self.loss.refresh(trainer.model)

    def after_step(self, trainer: Any) -> None:
        if trainer.step % self.every == 0:
            self.loss.refresh(trainer.model)

    def state_dict(self) -> dict[str, Any]:
        return {"copies": self.loss.copies_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_copies(state["copies"])
        self.restored = True
