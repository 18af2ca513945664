"""Unstructured and N:M pruning masks: which weights, scored how, cut where.

Prunable weights are the `weight` of every Linear and Conv layer, named by module. Saliency
is |w| ('l1'/'l2': the same order per weight), first-order Taylor |w · g| accumulated over a
few batches (Molchanov et al.), Optimal Brain Damage ½ H_ii w_i² with the Hessian diagonal
approximated by the empirical Fisher (LeCun et al. 1990), random (the control), or a user
function `fn(name, weight) -> scores`. Distribution: one global threshold across layers, the
same sparsity in every layer, or Erdős–Rényi-Kernel densities (Evci et al. 2020); per-layer
overrides by module-name pattern win over all three.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from effitrain.batch import move
from effitrain.config import locate
from effitrain.errors import ConfigError, not_allowed, require
from effitrain.layers import WEIGHT_LAYERS

SALIENCIES = ("l1", "l2", "taylor", "obd", "random")
GRADIENT_SALIENCIES = ("taylor", "obd")  # read `saliency_batches` training batches


def prunable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Module name → weight of every Linear/Conv layer, in model order."""
    return {name: module.weight for name, module in model.named_modules() if isinstance(module, WEIGHT_LAYERS)}


def layer_sparsities(names: Iterable[str], sparsity: float, overrides: dict[str, float], where: str) -> dict[str, float | None]:
    """Each layer's own sparsity from `overrides` (first matching pattern), else None (the default).

    Raises:
        ConfigError: a pattern that matches no prunable layer (listing the prunable layers), or
            an override outside [0, 1).
    """
    names = list(names)
    result: dict[str, float | None] = {name: None for name in names}
    for pattern, value in overrides.items():
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ConfigError(f"{where}: pattern {pattern!r} matches no prunable layer (prunable: {', '.join(names)})")
        require(0 <= float(value) < 1, f"{where}.{pattern}", value, "a sparsity in [0, 1)")
        for name in matched:
            if result[name] is None:
                result[name] = float(value)
    return result


def gradient_passes(
    model: nn.Module, batches: Iterable, loss_fn: Callable, device: torch.device | None, accumulate: bool
) -> Iterator[None]:
    """Backpropagate `loss_fn(model, inputs, targets)` over `batches` of (inputs, targets) in the
    model's current mode, yielding after each backward: the gradients of that batch alone, or of
    all batches so far with `accumulate`. Used by Taylor saliency, masked and structured.
    """
    model.zero_grad(set_to_none=True)
    for inputs, targets in batches:
        if not accumulate:
            model.zero_grad(set_to_none=True)
        loss_fn(model, move(inputs, device), move(targets, device)).backward()
        yield


def _examples(inputs: Any, targets: Any) -> Iterator[tuple[Any, Any]]:
    """One example at a time (as a batch of one) from a batch of tensors or dicts of tensors."""
    count = len(targets)
    for index in range(count):
        one = {key: value[index:index + 1] for key, value in inputs.items()} if isinstance(inputs, dict) else inputs[index:index + 1]
        yield one, targets[index:index + 1]


def fisher_diagonal(model: nn.Module, batches: Iterable, loss_fn: Callable, device: torch.device | None) -> dict[str, Tensor]:
    """The empirical Fisher's diagonal, mean over examples of the squared per-example gradient,
    for every parameter (by name): OBD's approximation of the Hessian diagonal at a trained
    point. The model is scored in eval mode (no dropout; BatchNorm with its running statistics,
    so a batch of one is defined), and left as it was.
    """
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    sums = {name: torch.zeros_like(param) for name, param in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            for one, target in _examples(inputs, targets):
                model.zero_grad(set_to_none=True)
                loss_fn(model, move(one, device), move(target, device)).backward()
                for name, param in params.items():
                    if param.grad is not None:
                        sums[name] += param.grad.detach() ** 2
                count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: total / max(count, 1) for name, total in sums.items()}


def saliency_scores(
    model: nn.Module,
    saliency: str,
    names: list[str],
    batches: Iterable | None = None,
    loss_fn: Callable | None = None,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Score every weight of the named layers (higher = keep); `batches` are (inputs, targets)."""
    weights = prunable(model)
    if saliency in ("l1", "l2"):
        return {name: weights[name].detach().abs() for name in names}
    if saliency == "random":
        return {name: torch.rand(weights[name].shape, generator=generator).to(weights[name].device) for name in names}
    if saliency == "taylor":
        assert batches is not None and loss_fn is not None
        scores = {name: torch.zeros_like(weights[name]) for name in names}
        was_training = model.training
        model.train()
        for _ in gradient_passes(model, batches, loss_fn, device, accumulate=False):
            for name in names:
                if weights[name].grad is not None:
                    scores[name] += (weights[name].detach() * weights[name].grad).abs()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return scores
    if saliency == "obd":
        assert batches is not None and loss_fn is not None
        fisher = fisher_diagonal(model, batches, loss_fn, device)
        return {name: 0.5 * fisher[f"{name}.weight"] * weights[name].detach() ** 2 for name in names}
    function = locate(saliency)
    return {name: function(name, weights[name].detach()).to(weights[name].device) for name in names}


def check_saliency(saliency: str, where: str) -> None:
    if saliency in SALIENCIES:
        return
    try:
        function = locate(saliency)
    except ImportError:
        function = None
    if not callable(function):
        raise not_allowed(where, saliency, f"{', '.join(SALIENCIES)}, or a dotted path to fn(name, weight) -> scores")


def erk_sparsities(shapes: dict[str, tuple[int, ...]], sparsity: float, own: dict[str, float | None], where: str) -> dict[str, float]:
    """Erdős–Rényi-Kernel per-layer sparsities (Evci et al. 2020, RigL) reaching `sparsity` over
    all the layers in `shapes` exactly (up to rounding to whole weights).

    A layer's density is ε · (sum of its dimensions) / (product of them); ε is solved so that
    the kept weights add up to (1 - sparsity) of the total, with layers whose density would
    pass 1 capped dense and ε solved again for the rest. Layers with an override keep it and
    count toward the total.

    Raises:
        ConfigError: the overrides leave too few weights to reach `sparsity` (saying the most
            that can be reached).
    """
    sizes = {name: int(torch.tensor(shape).prod()) for name, shape in shapes.items()}
    total = sum(sizes.values())
    fixed = {name: value for name, value in own.items() if value is not None and name in shapes}
    free = [name for name in shapes if name not in fixed]
    budget = (1 - sparsity) * total - sum((1 - value) * sizes[name] for name, value in fixed.items())
    reachable = sum(value * sizes[name] for name, value in fixed.items()) / total + sum(sizes[name] for name in free) / total
    if budget < 0:
        raise ConfigError(f"{where}.sparsity = {sparsity}: unreachable with distribution 'erk': the layers the overrides fix keep "
                          f"too many weights (allowed: at most {reachable:.4f}, or lower overrides)")
    raw = {name: sum(shapes[name]) / sizes[name] for name in free}
    dense: set[str] = set()
    while True:
        left = budget - sum(sizes[name] for name in dense)
        weighted = sum(raw[name] * sizes[name] for name in free if name not in dense)
        epsilon = left / weighted if weighted else 0.0
        capped = {name for name in free if name not in dense and epsilon * raw[name] > 1}
        if not capped:
            break
        dense |= capped
    result = {name: float(value) for name, value in fixed.items()}
    for name in free:
        result[name] = 0.0 if name in dense else 1 - epsilon * raw[name]
    return result


def magnitude_masks(scores: dict[str, Tensor], sparsity: float, own: dict[str, float | None], distribution: str,
                    where: str = "prune") -> dict[str, Tensor]:
    """Boolean keep-masks: the lowest-scoring fraction of weights is cut.

    Args:
        scores: per-layer scores.
        sparsity: the default target in [0, 1) (with 'erk': over all the layers in `scores`).
        own: per-layer overrides (None: the default applies).
        distribution: 'global' (one threshold over the default layers), 'uniform', or 'erk'.
    """
    if distribution == "erk":
        targets = erk_sparsities({name: tuple(score.shape) for name, score in scores.items()}, sparsity, own, where)
        return {name: _keep_top(score, targets[name]) for name, score in scores.items()}
    masks = {}
    shared = [name for name in scores if own.get(name) is None]
    for name in scores:
        if own.get(name) is not None or distribution == "uniform":
            target = own.get(name) if own.get(name) is not None else sparsity
            masks[name] = _keep_top(scores[name], target)  # type: ignore[arg-type]
    if distribution == "global" and shared:
        flat = torch.cat([scores[name].flatten().float() for name in shared])
        cut = int(round(sparsity * flat.numel()))
        if cut == 0:
            masks.update({name: torch.ones_like(scores[name], dtype=torch.bool) for name in shared})
        else:
            keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
            keep[torch.argsort(flat, stable=True)[:cut]] = False  # exact count, ties broken by position
            offset = 0
            for name in shared:
                size = scores[name].numel()
                masks[name] = keep[offset:offset + size].view_as(scores[name])
                offset += size
    return masks


def _keep_top(scores: Tensor, sparsity: float) -> Tensor:
    cut = int(round(sparsity * scores.numel()))
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if cut:
        keep[torch.argsort(scores.flatten().float(), stable=True)[:cut]] = False
    return keep.view_as(scores)


def nm_masks(scores: dict[str, Tensor], n: int, m: int, where: str) -> dict[str, Tensor]:
    """N:M masks: in every group of M consecutive input weights of an output, keep the N best.

    Raises:
        ConfigError: a layer whose inputs per output are not a multiple of M (exclude it with an
            override of 0).
    """
    masks = {}
    for name, score in scores.items():
        rows = score.reshape(score.shape[0], -1)
        if rows.shape[1] % m:
            raise ConfigError(
                f"{where}: layer {name} has {rows.shape[1]} inputs per output, not a multiple of M={m} "
                f"(exclude it: overrides: {{{name}: 0}})"
            )
        groups = rows.reshape(rows.shape[0], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
        masks[name] = keep.reshape(score.shape)
    return masks


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero the masked weights in place."""
    weights = prunable(model)
    with torch.no_grad():
        for name, mask in masks.items():
            weights[name].mul_(mask.to(weights[name].dtype))


def sparsity_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per prunable layer: name, type, shape, weights, zeros, sparsity."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_LAYERS):
            weight = module.weight.detach()
            zeros = int((weight == 0).sum())
            rows.append({"layer": name, "type": type(module).__name__, "shape": list(weight.shape), "weights": weight.numel(),
                         "zeros": zeros, "sparsity": zeros / max(weight.numel(), 1)})
    return rows
