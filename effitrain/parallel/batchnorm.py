"""BatchNorm whose training statistics cover the whole global batch, on any device.

torch's `nn.SyncBatchNorm` runs on GPUs only (its kernels are CUDA's); this layer computes the
same statistics with two autograd-aware all-reduces (sums, then squared deviations), so 2 gloo
processes on CPUs normalise exactly as one process on the whole batch does. On CUDA effitrain
uses torch's layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


class _SumOver(torch.autograd.Function):
    """Sum of a tensor over a process group, with the gradient of a sum (itself summed over the
    group: every process's output depends on every process's input)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def sum_over(tensor: Tensor, group: Any) -> Tensor:
    return _SumOver.apply(tensor, group)


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the examples of every process of `process_group` in training; the plain
    layer's arithmetic in evaluation (running statistics).

    Args:
        num_features, eps, momentum, affine, track_running_stats: as for nn.BatchNorm*d.
        process_group: the torch.distributed group to synchronise over (None: the default group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002  (nn.Module's argument name)
        self._check_input_dim(input)
        if not self.training:  # evaluation never synchronises: one process may evaluate alone
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1, *([1] * (input.dim() - 2))]
        values = input.float()
        count = torch.tensor([values.numel() / values.shape[1]], dtype=torch.float32, device=input.device)
        totals = sum_over(torch.cat([values.sum(dims), count]), self.process_group)
        examples = totals[-1]
        mean = totals[:-1] / examples
        centred = values - mean.view(shape)
        squares = sum_over((centred * centred).sum(dims), self.process_group)
        variance = squares / examples
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum  # type: ignore[arg-type]
                unbiased = variance * examples / (examples - 1).clamp(min=1)
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach().to(self.running_var.dtype), alpha=factor)
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output.to(input.dtype)
