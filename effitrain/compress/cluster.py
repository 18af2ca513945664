"""Weight clustering (k-means weight sharing, Han et al. 2016 "Deep Compression"): each layer's
weights are replaced by the nearest of k shared centroids, stored as a k-entry codebook plus
one index per weight (uint8, or two 4-bit indices per byte when k <= 16). The codebook is a
parameter: fine-tuning moves the centroids with the summed gradient of their weights.

A pruned layer keeps its zeros (Han et al. cluster the surviving weights only): entry 0 of its
codebook is held at exactly 0 and the other k - 1 centroids are fitted to the non-zero weights.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from effitrain.errors import require
from effitrain.quant.affine import pack, unpack
from effitrain.layers import conv_args, run_layer


def kmeans_1d(values: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (sorted) and labels of 1-D k-means, initialised linearly over the range (Han et al.)."""
    from sklearn.cluster import KMeans

    k = min(k, len(np.unique(values)))
    init = np.linspace(values.min(), values.max(), k).reshape(-1, 1)
    fit = KMeans(n_clusters=k, init=init, n_init=1, random_state=seed).fit(values.reshape(-1, 1))
    order = np.argsort(fit.cluster_centers_.ravel())
    remap = np.empty_like(order)
    remap[order] = np.arange(k)
    return fit.cluster_centers_.ravel()[order], remap[fit.labels_]


class ClusteredWeight(nn.Module):
    """A Linear/Conv layer whose weight is codebook[indices]."""

    def __init__(self, layer: nn.Module, k: int, seed: int = 0) -> None:
        super().__init__()
        require(2 <= k <= 256, "clusters", k, "an integer in [2, 256]")
        self.kind = type(layer).__name__
        self.shape = tuple(layer.weight.shape)
        self.conv = conv_args(layer)
        values = layer.weight.detach().cpu().float().numpy().ravel()
        zeros = values == 0
        if zeros.any() and (~zeros).sum() >= 1:  # pruned: index 0 is the exact zero, k - 1 centroids for the rest
            found, found_labels = kmeans_1d(values[~zeros], k - 1, seed)
            centroids = np.concatenate([[0.0], found])
            labels = np.zeros(len(values), dtype=np.int64)
            labels[~zeros] = found_labels + 1
        else:
            centroids, labels = kmeans_1d(values, k, seed)
        self.codebook = nn.Parameter(torch.tensor(centroids, dtype=torch.float32, device=layer.weight.device))
        # not saved: rebuilt from the layer on reload; keeps a pruned layer's zero centroid at 0 through fine-tuning
        keep = torch.ones(len(centroids), device=layer.weight.device)
        if zeros.any():
            keep[0] = 0.0
        self.register_buffer("keep", keep, persistent=False)
        self.bits = 4 if k <= 16 else 8
        # indices are levels 0..k-1: packed like unsigned quantization levels (two per byte at 4 bits)
        self.register_buffer("indices", pack(torch.tensor(labels, dtype=torch.int16), self.bits, "affine").to(layer.weight.device))
        self.bias = nn.Parameter(layer.bias.detach().clone()) if getattr(layer, "bias", None) is not None else None

    def index_tensor(self) -> Tensor:
        return unpack(self.indices, self.bits, "affine", (int(np.prod(self.shape)),)).long()

    def weight(self) -> Tensor:
        return (self.codebook * self.keep)[self.index_tensor()].reshape(self.shape)

    def weight_counts(self) -> tuple[int, int]:
        weight = self.weight()
        return weight.numel(), int(torch.count_nonzero(weight))

    def forward(self, inputs: Tensor) -> Tensor:
        return run_layer(self.kind, inputs, self.weight(), self.bias, self.conv)
