"""Structured pruning with physical removal, through Torch-Pruning's DepGraph (Fang et al.
2023): removing a conv's output channels also shrinks the batch-norm after it, the next
layer's inputs, residual partners and the classifier, so the result is a smaller dense model.
The output layer (the one producing the logits) is never pruned.

Transformers (Hugging Face BERT family): attention heads are removed whole (query/key/value
rows of a head together, `head_pruning_ratio` = sparsity) and FFN neurons by the same ratio;
the residual stream's width (hidden_size) is kept, so embeddings and layer norms stay as they are.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from effitrain.batch import forward, move
from effitrain.errors import ConfigError
from effitrain.layers import WEIGHT_LAYERS, replace_layers
from effitrain.prune.masks import fisher_diagonal, gradient_passes


def _output_layer(model: nn.Module) -> nn.Module:
    layers = [module for module in model.modules() if isinstance(module, WEIGHT_LAYERS)]
    if not layers:
        raise ConfigError(f"structured pruning: {type(model).__name__} has no Linear or Conv layers to prune")
    return layers[-1]


def _importance(saliency: str) -> Any:
    import torch_pruning as tp

    if saliency == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if saliency == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if saliency == "taylor":
        return tp.importance.TaylorImportance()
    if saliency == "obd":  # reads the Hessian diagonal from .grad: prune_channels puts the Fisher diagonal there
        return tp.importance.GroupHessianImportance()
    if saliency == "random":
        return tp.importance.RandomImportance()
    raise ConfigError(f"saliency = {saliency!r} is not supported for structured pruning (allowed: l1, l2, taylor, obd, random)")


def prune_channels(
    model: nn.Module,
    example: Any,
    sparsity: float,
    own: dict[str, float | None],
    saliency: str,
    distribution: str,
    where: str,
    saliency_batches: Iterable | None = None,
    loss_fn: Callable | None = None,
    device: torch.device | None = None,
) -> list[str]:
    """Remove the `sparsity` fraction of output channels/neurons (per layer, or globally ranked).

    Args:
        model: pruned in place.
        example: example inputs for tracing the dependency graph.
        own: per-layer sparsity overrides by module name (0 leaves a layer whole).
        saliency_batches, loss_fn, device: for Taylor and OBD saliency, the batches whose gradients score channels.

    Returns:
        The layers whose output channels the default `sparsity` applies to (not the output
        layer, not the residual stream, no override of their own): what `achieved` is measured over.

    Raises:
        ConfigError: a layer type the dependency graph cannot handle, or an override on a layer
            that is not Linear/Conv.
    """
    import torch_pruning as tp

    modules = dict(model.named_modules())
    for name, value in own.items():
        if value is not None and not isinstance(modules[name], WEIGHT_LAYERS):
            raise ConfigError(f"{where}: layer {name} is {type(modules[name]).__name__}; structured pruning supports Linear and Conv layers")
    output = _output_layer(model)
    ignored = [output] + [modules[name] for name, value in own.items() if value == 0]
    attention = attention_modules(model)
    head_options: dict[str, Any] = {}
    if attention:
        hidden = model.config.hidden_size  # type: ignore[union-attr]
        heads = {projection: module.num_attention_heads for module in attention for projection in (module.query, module.key, module.value)}
        # keep the residual stream: layers writing hidden_size-wide outputs (other than q/k/v) are not pruned
        ignored += [module for module in model.modules()
                    if isinstance(module, nn.Linear) and module.out_features == hidden and module not in heads]
        head_options = {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": sparsity}
    ratios = {modules[name]: value for name, value in own.items() if value not in (None, 0)}
    was_training = model.training
    model.eval()
    try:
        pruner = tp.pruner.MetaPruner(
            model, move(example, device) if device is not None else example, importance=_importance(saliency),
            pruning_ratio=sparsity, pruning_ratio_dict=ratios or None, ignored_layers=ignored,
            global_pruning=distribution == "global", forward_fn=lambda m, x: forward(m, x), **head_options,
        )
        if saliency == "taylor":  # Torch-Pruning's TaylorImportance reads the summed gradients
            assert saliency_batches is not None and loss_fn is not None
            for _ in gradient_passes(model, saliency_batches, loss_fn, device, accumulate=True):
                pass
        if saliency == "obd":  # our own per-example Fisher (its accumulate_grad keeps only the last example's)
            assert saliency_batches is not None and loss_fn is not None
            fisher = fisher_diagonal(model, saliency_batches, loss_fn, device)
            for param_name, param in model.named_parameters():
                if param_name in fisher:
                    param.grad = fisher[param_name]
        pruner.step()
        model.zero_grad(set_to_none=True)
        for module in attention:  # tell the attention modules how many heads they have left
            module.num_attention_heads = pruner.num_heads[module.query]
            module.all_head_size = module.query.out_features
    except ConfigError:
        raise
    except Exception as error:  # the tracer meets an operation it cannot follow
        raise ConfigError(
            f"{where}: structured pruning cannot handle {type(model).__name__} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "supported: Conv/Linear networks with BatchNorm, residual adds and concatenations"
        ) from None
    model.train(was_training)
    return [name for name, module in modules.items() if isinstance(module, WEIGHT_LAYERS)
            and own.get(name) is None and all(module is not other for other in ignored)]


def channels(model: nn.Module) -> dict[str, int]:
    """Output channels (Conv) or features (Linear) of every weight layer, by name."""
    return {name: module.weight.shape[0] for name, module in model.named_modules() if isinstance(module, WEIGHT_LAYERS)}


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Hugging Face self-attention modules (query/key/value projections and a head count)."""
    return [module for module in model.modules()
            if all(hasattr(module, key) for key in ("query", "key", "value", "num_attention_heads", "all_head_size"))]


def shrink_to(model: nn.Module, shapes: dict[str, tuple[int, ...]], example: Any) -> nn.Module:
    """Shrink `model`'s layers to the saved weight `shapes` (so a pruned checkpoint loads).

    Which channels go does not matter: the saved weights overwrite them all, so the shapes are
    read from the file, whatever saliency, distribution or schedule chose them. Transformers:
    each Linear takes its saved shape and the attention modules their head counts from it.
    """
    if attention_modules(model):
        return _resize_linears(model, shapes)
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=lambda m, x: forward(m, x))
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        if isinstance(module, WEIGHT_LAYERS) and key in shapes:
            excess = module.weight.shape[0] - shapes[key][0]
            if excess > 0:
                prune_fn = tp.prune_conv_out_channels if isinstance(module, nn.modules.conv._ConvNd) else tp.prune_linear_out_channels
                graph.get_pruning_group(module, prune_fn, idxs=list(range(excess))).prune()
    return model


def _resize_linears(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    for name, module in list(model.named_modules()):
        shape = shapes.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and shape is not None and tuple(module.weight.shape) != shape:
            replacement = nn.Linear(shape[1], shape[0], bias=module.bias is not None, device=module.weight.device, dtype=module.weight.dtype)
            replace_layers(model, [name], lambda _: replacement)
    for attention in attention_modules(model):  # heads left = query width / head width
        attention.all_head_size = attention.query.out_features
        attention.num_attention_heads = attention.all_head_size // attention.attention_head_size
    return model
