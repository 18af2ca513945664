"""Sparse kernels for unstructured sparsity: a Linear layer whose weight is a CSR matrix, run
through torch's sparse matmul (MKL on x86 CPUs), and the per-layer choice by measurement.

A pruned model is exactly as slow as the dense one until its zeros are skipped. Whether CSR is
faster depends on the layer's shape, its sparsity, the batch and the machine (on the 2-core
machines here it needed about 90% zeros: see benchmarks/sparse_speed.py), so `choose_kernels`
times each candidate layer dense and sparse on the input it really gets, interleaved, and keeps
CSR only where it is at least `MIN_SPEEDUP` faster.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from effitrain.batch import forward
from effitrain.layers import replace_layers
from effitrain.retime import interleaved

MIN_SPEEDUP = 1.05


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W (out x in) held as CSR (crow_indices, col_indices, values).

    The rows of the input are multiplied as W @ xᵀ (sparse times dense), then transposed back.
    """

    def __init__(self, layer: nn.Linear | None = None, nonzero: int = 0, shape: tuple[int, int] = (1, 1), bias: bool = True) -> None:
        super().__init__()
        if layer is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                csr = layer.weight.detach().to_sparse_csr()
            shape, bias = tuple(layer.weight.shape), layer.bias is not None  # type: ignore[assignment]
            crow, col, values = csr.crow_indices(), csr.col_indices(), csr.values()
        else:  # a placeholder of the right sizes, for loading a saved state
            crow = torch.zeros(shape[0] + 1, dtype=torch.int64)
            col, values = torch.zeros(nonzero, dtype=torch.int64), torch.zeros(nonzero)
        self.shape = (int(shape[0]), int(shape[1]))
        self.register_buffer("crow_indices", crow.clone())
        self.register_buffer("col_indices", col.clone())
        self.register_buffer("values", values.clone())
        self.bias = nn.Parameter(layer.bias.detach().clone() if layer is not None else torch.zeros(shape[0])) if bias else None

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def matrix(self) -> Tensor:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values, self.shape)

    def dense_weight(self) -> Tensor:
        return self.matrix().to_dense()

    def weight_counts(self) -> tuple[int, int]:
        """(weights, non-zero weights): the ledger counts the dense shape as parameters."""
        return self.shape[0] * self.shape[1], int(torch.count_nonzero(self.values))

    def forward(self, inputs: Tensor) -> Tensor:
        rows = inputs.reshape(-1, self.shape[1])
        out = (self.matrix() @ rows.T.contiguous()).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*inputs.shape[:-1], self.shape[0])

    def extra_repr(self) -> str:
        return f"in_features={self.shape[1]}, out_features={self.shape[0]}, nonzero={self.values.numel()}, bias={self.bias is not None}"


def layer_sparsity(layer: nn.Linear) -> float:
    weight = layer.weight.detach()
    return float((weight == 0).sum()) / max(weight.numel(), 1)


def layer_inputs(model: nn.Module, example: Any, names: list[str]) -> dict[str, Tensor]:
    """The input each named layer receives when `model` runs `example` (one forward, no grad)."""
    seen: dict[str, Tensor] = {}
    modules = dict(model.named_modules())

    def keeper(name: str) -> Any:
        def keep(module: nn.Module, args: tuple, output: Tensor) -> None:  # returns None: the output stays as it is
            seen.setdefault(name, args[0].detach())
        return keep

    handles = [modules[name].register_forward_hook(keeper(name)) for name in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward(model, example)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen


@dataclass
class KernelChoice:
    """One layer's measurement: dense and CSR milliseconds on its real input, and the pick."""

    layer: str
    sparsity: float
    dense_ms: float
    sparse_ms: float

    @property
    def sparse(self) -> bool:
        return self.dense_ms >= MIN_SPEEDUP * self.sparse_ms

    def describe(self) -> str:
        return f"{self.layer} ({self.sparsity:.0%} zeros) dense {self.dense_ms:.3f} ms, csr {self.sparse_ms:.3f} ms -> {'csr' if self.sparse else 'dense'}"


def choose_kernels(model: nn.Module, example: Any, names: list[str], rounds: int, passes: int, warmup: int) -> list[KernelChoice]:
    """Time every named Linear layer dense and as SparseLinear on its real input, interleaved."""
    inputs = layer_inputs(model, example, names)
    modules = dict(model.named_modules())
    choices = []
    for name in names:
        if name not in inputs:  # not on the forward path of this input
            continue
        layer, x = modules[name], inputs[name]
        sparse = SparseLinear(layer)
        with torch.no_grad():
            times = interleaved({"dense": lambda: layer(x), "csr": lambda: sparse(x)}, rounds, passes, warmup)
        choices.append(KernelChoice(name, layer_sparsity(layer), times["dense"], times["csr"]))
    return choices


def apply_kernels(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the named Linear layers by SparseLinear, in place."""
    return replace_layers(model, names, lambda layer: SparseLinear(layer))


def restore_kernels(model: nn.Module, saved: dict[str, tuple[int, ...]]) -> nn.Module:
    """Give `model` the SparseLinear layers a saved state has (from its tensor shapes)."""
    modules = dict(model.named_modules())
    layers = {key[: -len(".col_indices")]: shape[0] for key, shape in saved.items() if key.endswith(".col_indices")}
    for name, nonzero in layers.items():
        layer = modules.get(name)
        if isinstance(layer, nn.Linear):
            replace_layers(model, [name], lambda old, nonzero=nonzero: SparseLinear(None, nonzero, tuple(old.weight.shape), old.bias is not None).to(old.weight.device))
    return model
