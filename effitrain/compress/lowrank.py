"""Low-rank factorisation: W (out x in) ≈ (U_r √S_r)(√S_r V_rᵀ) by truncated SVD, so one
Linear (or 1x1 Conv) becomes two thinner ones with r (in + out) instead of in · out weights.
The rank is a fraction of the full rank or the smallest one keeping `energy` of Σ s_i².
Layers that would not get smaller are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from effitrain.errors import ConfigError


def _matrix(layer: nn.Module) -> torch.Tensor:
    weight = layer.weight.detach().float()
    return weight.reshape(weight.shape[0], -1)


def factorizable(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1)


def choose_rank(layer: nn.Module, rank_ratio: float | None, energy: float | None) -> int:
    """The rank for `layer` from a ratio of its full rank or an energy threshold."""
    matrix = _matrix(layer)
    full = min(matrix.shape)
    if rank_ratio is not None:
        return max(1, int(round(rank_ratio * full)))
    values = torch.linalg.svdvals(matrix)
    kept = torch.cumsum(values**2, 0) / (values**2).sum()
    return int(torch.searchsorted(kept, torch.tensor(energy)).item()) + 1


def factorize(layer: nn.Module, rank: int) -> nn.Sequential:
    """Two layers whose product is the best rank-`rank` approximation of `layer` (Eckart–Young)."""
    matrix = _matrix(layer)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    first_weight, second_weight = root.unsqueeze(1) * vh[:rank], u[:, :rank] * root
    out_features, in_features = matrix.shape
    if isinstance(layer, nn.Linear):
        first, second = nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=layer.bias is not None)
    else:
        first = nn.Conv2d(in_features, rank, 1, stride=layer.stride, bias=False)
        second = nn.Conv2d(rank, out_features, 1, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(first_weight.reshape(first.weight.shape))
        second.weight.copy_(second_weight.reshape(second.weight.shape))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).to(layer.weight.device)


def plan(model: nn.Module, names: list[str], rank_ratio: float | None, energy: float | None) -> dict[str, int]:
    """Ranks for the named layers that get smaller when factorised (others are left out)."""
    modules = dict(model.named_modules())
    ranks = {}
    for name in names:
        layer = modules[name]
        if not factorizable(layer):
            raise ConfigError(f"low-rank: layer {name} is {type(layer).__name__}; only Linear and 1x1 Conv2d layers can be factorised")
        rank = choose_rank(layer, rank_ratio, energy)
        out_features, in_features = _matrix(layer).shape
        if rank * (in_features + out_features) < in_features * out_features:
            ranks[name] = rank
    return ranks


def apply(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Replace each layer in `ranks` by its factorisation, in place."""
    for name, rank in ranks.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, factorize(getattr(parent, attribute), rank))
    return model
