"""SimCLR (Chen et al. 2020): two random views of each image, the encoder and a small projection
head, and the NT-Xent loss, which pulls each view towards the other view of its image and away
from the views of every other image in the batch. Labels are never read. The projection head is
used only while pre-training (the paper's finding: the layer before it transfers better).

NT-Xent is written here (a dozen lines, tested against the paper's formula): lightly has it,
but it requires PyTorch Lightning, a heavier dependency than the loss. On several processes the
projections of every process are gathered, so the negatives are the whole global batch's, as in
one process.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effitrain.parallel.world import Group, gather_rows
from effitrain.selfsup.encoder import Encoder
from effitrain.tasks.base import Task


def nt_xent(z1: Tensor, z2: Tensor, temperature: float, group: Group | None = None) -> Tensor:
    """Normalised temperature-scaled cross-entropy over the 2N views of N images.

    For view i with positive j(i): l_i = -log( exp(sim(z_i, z_j)/T) / sum_{k != i} exp(sim(z_i, z_k)/T) ),
    sim the cosine similarity; the loss is the mean of l_i over this process's 2n views, the
    candidates k being every process's views when `group` spans several.

    Args:
        z1, z2: (n, d) projections of the two views of this process's n images.
        temperature: T > 0.
        group: the processes whose views are each other's negatives (None: this one alone).
    """
    n = z1.shape[0]
    first, second, offset = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1), 0
    if group is not None and group.size > 1:
        first, offset = gather_rows(first, group)
        second, _ = gather_rows(second, group)
    total = first.shape[0]
    candidates = torch.cat([first, second])  # 2N rows: every image's first views, then its second views
    anchors = torch.cat([first[offset:offset + n], second[offset:offset + n]])
    logits = anchors @ candidates.T / temperature
    mine = torch.arange(offset, offset + n, device=z1.device)
    own = torch.cat([mine, mine + total])  # each anchor's own row among the candidates
    positives = torch.cat([mine + total, mine])
    logits[torch.arange(2 * n, device=z1.device), own] = float("-inf")
    return F.cross_entropy(logits, positives)


class TwoViews:
    """Collate for pre-training: two independent random views of every image (labels dropped).

    Args:
        views: a transform drawing one random view of one image (tensors v2).
    """

    def __init__(self, views: Callable[[Tensor], Tensor]) -> None:
        self.views = views

    def __call__(self, samples: list) -> tuple[dict[str, Tensor], None]:
        images = [sample[0] for sample in samples]
        return {"view1": torch.stack([self.views(image) for image in images]),
                "view2": torch.stack([self.views(image) for image in images])}, None


class SimCLR(nn.Module):
    """The training loss `loss(model, views, None)`: NT-Xent on projections of the encoder's
    representation of both views (one forward pass over both, as the paper's batch statistics).

    Args:
        encoder: where the model's representation is.
        width: the representation's width.
        projection_dim: the projection head's output width.
        temperature: NT-Xent's T.
        group: the processes sharing negatives (the trainer's; None: this process alone).
    """

    def __init__(self, encoder: Encoder, width: int, projection_dim: int, temperature: float, group: Group | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        self.group = group
        self.projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, projection_dim))

    def projections(self, model: nn.Module, views: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        both = torch.cat([views["view1"], views["view2"]])
        z = self.projection(self.encoder.features(model, both))
        return z[: len(views["view1"])], z[len(views["view1"]):]

    def forward(self, model: nn.Module, views: dict[str, Tensor], targets: Any = None) -> Tensor:  # type: ignore[override]
        z1, z2 = self.projections(model, views)
        return nt_xent(z1, z2, self.temperature, self.group)


class Contrastive(Task):
    """The pretext task while pre-training: batches of two views, no labels; the metric is the
    NT-Xent loss (this process's batch only), so `val_loss` picks the best epoch."""

    metrics: ClassVar[dict[str, str]] = {"loss": "min"}
    headline: ClassVar[str] = "loss"

    def __init__(self, objective: SimCLR) -> None:
        self.objective = objective

    def split(self, batch: Any) -> tuple[Any, Any]:
        return batch[0], None

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> Tensor:
        return self.objective(model, inputs)

    def outputs(self, model: nn.Module, inputs: Any) -> Any:
        return self.objective.projections(model, inputs)

    def score(self, outputs: Any, targets: Any) -> dict[str, float]:
        z1, z2 = outputs
        return {"loss": nt_xent(z1, z2, self.objective.temperature).item() * len(z1)}
