"""Online codistillation (Anil et al. 2018): N peers of one architecture train together; each
minimises cross-entropy plus `weight` times the KL to the mean of the other peers' predictions
on its own batch, switched on after `burn_in_steps`. Peers may each see their own data order.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from effitrain.batch import forward
from effitrain.data.bundle import SeededShuffle
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
