"""Data-parallel training: the model and its loss as one module, wrapped in torch's
DistributedDataParallel when several processes train it.

The loss is part of the wrapped module, so parameters a loss trains (a distillation's feature
projections) are synchronised like the model's, and every forward goes through DDP (codistilled
peers, distillation hooks). Hooks keep reaching layers by name through the unwrapped model.
BatchNorm layers become SyncBatchNorm while training when asked (batch statistics over the whole
global batch), and plain BatchNorm again afterwards, so later stages, measurement and export see
the model's own layer types.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from effitrain.errors import TrainingError
from effitrain.parallel.batchnorm import GroupBatchNorm
from effitrain.parallel.world import Group


class Objective(nn.Module):
    """`forward(inputs, targets)` is `loss_fn(model, inputs, targets)`; an nn.Module loss is a
    submodule (its parameters train and synchronise with the model's)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss_fn if isinstance(loss_fn, nn.Module) else None
        self._loss_fn = loss_fn if self.loss is None else None

    def forward(self, inputs: Any, targets: Any) -> Tensor:  # type: ignore[override]
        loss_fn = self.loss if self.loss is not None else self._loss_fn
        assert loss_fn is not None
        return loss_fn(self.model, inputs, targets)


def to_sync_batchnorm(model: nn.Module, group: Group, device: torch.device) -> dict[str, type]:
    """Replace every BatchNorm layer of `model` by a synchronised one over `group` (torch's
    SyncBatchNorm on CUDA, `GroupBatchNorm` elsewhere), in place, keeping its parameters and
    buffers; returns {layer name: its original class} for `from_sync_batchnorm`."""
    synchronised = nn.SyncBatchNorm if device.type == "cuda" else GroupBatchNorm
    originals = {name: type(module) for name, module in model.named_modules() if isinstance(module, _BatchNorm) and name}
    for name, kind in originals.items():
        parent, _, attribute = name.rpartition(".")
        layer = model.get_submodule(name)
        synced = synchronised(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                              process_group=group.handle)
        _take_state(synced, layer)
        setattr(model.get_submodule(parent) if parent else model, attribute, synced)
    return originals


def from_sync_batchnorm(model: nn.Module, originals: dict[str, type]) -> None:
    """Undo `to_sync_batchnorm`: each layer back to its own BatchNorm class, same tensors."""
    for name, kind in originals.items():
        parent, _, attribute = name.rpartition(".")
        synced = model.get_submodule(name)
        layer = kind(synced.num_features, synced.eps, synced.momentum, synced.affine, synced.track_running_stats)
        _take_state(layer, synced)
        setattr(model.get_submodule(parent) if parent else model, attribute, layer)


def _take_state(target: nn.Module, source: nn.Module) -> None:
    """Point `target`'s parameters and buffers at `source`'s tensors (the optimizer keeps working)."""
    target.train(source.training)
    for key in ("weight", "bias"):
        if getattr(source, key, None) is not None:
            setattr(target, key, getattr(source, key))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        if getattr(source, key, None) is not None:
            target.register_buffer(key, getattr(source, key))
    target.to(next((tensor.device for tensor in source.state_dict().values()), torch.device("cpu")))


class Replicas:
    """The module a training step calls: the objective itself on one process, or DDP around it.

    Use as a context manager for the length of a fit: BatchNorm layers of `model` are
    synchronised inside (with `sync_batchnorm`) and restored on the way out, also after an error;
    then `wrap` the module training steps call (the model or its torch.compile) with the loss.

    Args:
        model: the model being trained (its BatchNorm layers are swapped in place).
        group: the processes training it.
        device: the run device (CUDA: this process's GPU).
        sync_batchnorm: synchronised BatchNorm while training.
    """

    def __init__(self, model: nn.Module, group: Group, device: torch.device, sync_batchnorm: bool) -> None:
        self.model = model
        self.group = group
        self.device = device
        self.sync_batchnorm = sync_batchnorm and group.size > 1
        self._originals: dict[str, type] = {}
        self.module: nn.Module | None = None

    def __enter__(self) -> "Replicas":
        if self.sync_batchnorm:
            self._originals = to_sync_batchnorm(self.model, self.group, self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._originals:
            from_sync_batchnorm(self.model, self._originals)
            self._originals = {}
        self.module = None

    def wrap(self, train_model: nn.Module, loss_fn: Callable[[nn.Module, Any, Any], Tensor]) -> None:
        """Build what `loss` calls: the objective of `train_model` and `loss_fn`, in DDP when
        several processes train (its construction copies the leader's parameters and buffers to
        every process)."""
        objective = Objective(train_model, loss_fn)
        if self.group.size == 1:
            self.module = objective
            return
        from torch.nn.parallel import DistributedDataParallel

        cuda = self.device.type == "cuda"
        self.module = DistributedDataParallel(objective, device_ids=[self.device.index] if cuda else None,
                                              output_device=self.device.index if cuda else None, process_group=self.group.handle)

    def accumulating(self, last: bool) -> ContextManager:
        """Inside: backward passes keep their gradients local (gradient accumulation); the last
        micro-batch of a step synchronises them once."""
        if last or self.group.size == 1:
            return contextlib.nullcontext()
        return self.module.no_sync()  # type: ignore[union-attr,operator]

    def loss(self, inputs: Any, targets: Any) -> Tensor:
        """The objective's loss on one micro-batch (through DDP when replicated)."""
        assert self.module is not None, "wrap() first"
        try:
            return self.module(inputs, targets)
        except RuntimeError as error:
            if "Expected to have finished reduction" in str(error):
                raise TrainingError(
                    "trainer.devices > 1: a trainable parameter got no gradient in a training step (a layer the forward "
                    "skipped); DistributedDataParallel needs every trainable parameter used in each step "
                    "(allowed: freeze such parameters with requires_grad=False, or trainer.devices=1)") from None
            raise
