"""How good a representation is without training a classifier on it: weighted k-nearest-neighbour
accuracy (Wu et al. 2018, the monitor SimCLR-style methods report). Each query takes its k most
cosine-similar labelled training examples, which vote for their class with weight
exp(similarity / 0.07); the query's prediction is the class with the most weight."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effitrain.batch import move
from effitrain.precision import PrecisionPolicy
from effitrain.selfsup.encoder import Encoder

VOTE_TEMPERATURE = 0.07


@torch.no_grad()
def features_of(encoder: Encoder, model: nn.Module, loader: Iterable, split: Any, precision: PrecisionPolicy) -> tuple[Tensor, Tensor]:
    """(normalised representations, labels) of every example of `loader`, in eval mode."""
    was_training = model.training
    model.eval()
    rows, labels = [], []
    try:
        for batch in loader:
            inputs, targets = split(batch)
            with precision.autocast():
                rows.append(F.normalize(encoder.features(model, move(inputs, precision.device)).float(), dim=1).cpu())
            labels.append(torch.as_tensor(targets).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows), torch.cat(labels)


def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, k: int, num_classes: int) -> float:
    """The fraction of queries whose weighted k-NN vote among `bank` names their label.

    Args:
        bank, queries: L2-normalised representations, one row per example.
        k: neighbours per query (at most the bank's size).
    """
    k = min(k, len(bank))
    similarity, nearest = (queries @ bank.T).topk(k, dim=1)
    votes = torch.zeros(len(queries), num_classes).scatter_add_(1, bank_labels[nearest], (similarity / VOTE_TEMPERATURE).exp())
    return float((votes.argmax(dim=1) == query_labels).float().mean())
