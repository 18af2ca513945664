"""Sparse kernels for unstructured sparsity: Linear and 1x1 convolution layers whose weight is a
CSR matrix, run through torch's sparse matmul (MKL on x86 CPUs), and the per-layer choice by
measurement.

A pruned model is exactly as slow as the dense one until its zeros are skipped. Whether CSR is
faster depends on the layer's shape, its sparsity, the batch and the machine (on the 2-core
machines here it needed about 90% zeros: see benchmarks/sparse_speed.py), so `choose_kernels`
times each candidate layer dense and sparse on the input it really gets, interleaved, and keeps
CSR only where it is at least `MIN_SPEEDUP` faster.

A 1x1 convolution is a matrix product over channels at every pixel (what Fast Sparse ConvNets,
Elsen et al. 2020, make sparse): its (out, in, 1, 1) weight is the (out, in) CSR matrix and the
input's pixels are the columns it multiplies.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from effitrain.batch import forward
from effitrain.layers import replace_layers
from effitrain.precision import PrecisionPolicy
from effitrain.retime import interleaved, synchronizer

MIN_SPEEDUP = 1.05


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W (out x in) held as CSR (crow_indices, col_indices, values).

    The rows of the input are multiplied as W @ xᵀ (sparse times dense), then transposed back.
    """

    def __init__(self, layer: nn.Module | None = None, nonzero: int = 0, shape: tuple[int, int] = (1, 1), bias: bool = True) -> None:
        super().__init__()
        if layer is not None:
            weight = layer.weight.detach()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                csr = weight.reshape(weight.shape[0], -1).to_sparse_csr()  # a 1x1 conv's (out, in, 1, 1) is (out, in)
            shape, bias = tuple(csr.shape), layer.bias is not None  # type: ignore[assignment]
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
        rows = inputs.reshape(-1, self.shape[1]).to(self.values.dtype)  # sparse matmul takes one dtype (no autocast)
        out = (self.matrix() @ rows.T.contiguous()).T
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*inputs.shape[:-1], self.shape[0]).to(inputs.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.shape[1]}, out_features={self.shape[0]}, nonzero={self.values.numel()}, bias={self.bias is not None}"

    def dense_layer(self) -> nn.Module:
        """The dense layer with the same values (for runtimes without sparse kernels, e.g. ONNX)."""
        return _filled(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None), self.dense_weight(), self.bias)


def _filled(dense: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """`dense` (a new Linear or Conv layer) holding `weight` (reshaped to its own) and `bias`, on their device."""
    with torch.no_grad():
        dense.weight.copy_(weight.reshape(dense.weight.shape))
        if bias is not None:
            dense.bias.copy_(bias)
    return dense.to(weight.device)


class SparseConv1x1(SparseLinear):
    """A 1x1 convolution (Conv1d or Conv2d, any stride, no padding, one group) with its weight
    as a CSR (out x in) matrix times the input's pixels, in one of two layouts (both measured by
    `sparsify`, kernels 'csr' and 'csr per image'):
    - columns: the pixels of the whole batch are the columns of one sparse times dense product
      (the batch is transposed in and out: free for one image, a copy each way for more);
    - per image: one product per image on its own pixels, written straight into the output
      (no transposes; one call per image).

    Args:
        layer: the convolution (see `csr_unsupported` for which ones).
        nonzero: None to take `layer`'s weight; else an empty placeholder with this many
            non-zeros, the layout a saved state is loaded into.
        per_image: the per-image layout (a buffer: saved with the layer).
    """

    def __init__(self, layer: nn.Conv1d | nn.Conv2d, nonzero: int | None = None, per_image: bool = False) -> None:
        if nonzero is None:
            super().__init__(layer)
        else:
            super().__init__(None, nonzero, (layer.out_channels, layer.in_channels), layer.bias is not None)
        self.stride = tuple(int(step) for step in layer.stride)
        self.register_buffer("per_image", torch.tensor(per_image, device=self.values.device))

    def forward(self, inputs: Tensor) -> Tensor:
        unbatched = inputs.dim() == len(self.stride) + 1
        x = inputs.unsqueeze(0) if unbatched else inputs
        if any(step > 1 for step in self.stride):  # a strided 1x1 convolution reads every step-th pixel
            x = x[(slice(None), slice(None)) + tuple(slice(None, None, step) for step in self.stride)]
        batch, channels, *pixels = x.shape
        x, matrix = x.to(self.values.dtype), self.matrix()
        if batch == 1:
            out = (matrix @ x.reshape(channels, -1)).unsqueeze(0)
        elif bool(self.per_image):
            out = x.new_empty(batch, self.shape[0], x[0, 0].numel())
            for index in range(batch):
                out[index] = matrix @ x[index].reshape(channels, -1)
        else:
            out = (matrix @ x.transpose(0, 1).reshape(channels, -1)).reshape(self.shape[0], batch, -1).transpose(0, 1)
        out = out.reshape(batch, self.shape[0], *pixels)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, *([1] * len(pixels)))
        out = out.contiguous().to(inputs.dtype)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return (super().extra_repr().replace("in_features", "in_channels").replace("out_features", "out_channels")
                + f", stride={self.stride}" + (", per image" if bool(self.per_image) else ""))

    def dense_layer(self) -> nn.Module:
        conv = nn.Conv1d if len(self.stride) == 1 else nn.Conv2d
        return _filled(conv(self.in_features, self.out_features, 1, stride=self.stride, bias=self.bias is not None), self.dense_weight(), self.bias)


CSR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def csr_unsupported(layer: nn.Module) -> str | None:
    """Why this layer has no CSR kernel here (a clause), or None: Linear layers always have
    one, convolutions when they are 1x1 without padding or groups."""
    if isinstance(layer, nn.Linear):
        return None
    if not isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return f"a {type(layer).__name__}"
    if any(size != 1 for size in layer.kernel_size):
        return f"a {'x'.join(map(str, layer.kernel_size))} convolution (1x1 only)"
    if not isinstance(layer.padding, str) and any(int(pad) != 0 for pad in layer.padding):  # 'same' and 'valid' pad a 1x1 by 0
        return "a padded 1x1 convolution"
    if layer.groups != 1:
        return "a grouped convolution"
    return None


def sparse_kernel(layer: nn.Module, kernel: str = "csr") -> SparseLinear:
    """The CSR twin of a Linear or 1x1 convolution layer ('csr per image': a convolution's
    per-image layout)."""
    return SparseLinear(layer) if isinstance(layer, nn.Linear) else SparseConv1x1(layer, per_image=kernel == "csr per image")  # type: ignore[arg-type]


def layer_sparsity(layer: nn.Module) -> float:
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


# -- 2:4 semi-structured sparsity (CUDA) ------------------------------------------------------

# torch's two semi-structured kernels and the dtypes each takes (torch.sparse's classes say so too):
# cuSPARSELt (fp16/bf16) and CUTLASS (fp16/bf16/fp32). Both need CUDA from Ampere on.
SEMI_STRUCTURED = {"2:4 cusparselt": ("SparseSemiStructuredTensorCUSPARSELT", (torch.float16, torch.bfloat16)),
                   "2:4 cutlass": ("SparseSemiStructuredTensorCUTLASS", (torch.float16, torch.bfloat16, torch.float32))}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def is_two_four(weight: Tensor) -> bool:
    """Whether each run of 4 weights along every row (the input dimension) holds at most 2
    non-zeros: the pattern the 2:4 kernels compress (nm pruning with n=2, m=4 makes it)."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    if rows.shape[1] % 4:
        return False
    return bool(((rows.reshape(rows.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


class SemiStructuredLinear(nn.Module):
    """A Linear layer whose 2:4-sparse weight runs through one of torch's semi-structured sparse
    kernels on CUDA (`SEMI_STRUCTURED`), in one dtype (the run's: fp16/bf16 under autocast, else
    fp32).

    Its state is the Linear's (the weight with its zeros, the bias) plus `semi_structured`, the
    kernel and dtype as two codes, so a reload rebuilds this layer; the compressed weight is made
    from `weight` at the first CUDA forward (and again after a load). Off CUDA (the model
    reloaded on a CPU, ONNX export) it computes the dense Linear with the same values.
    """

    def __init__(self, layer: nn.Linear, kernel: str = "2:4 cutlass", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False) if layer.bias is not None else None
        code = torch.tensor([list(SEMI_STRUCTURED).index(kernel), _DTYPE_CODES[dtype]], dtype=torch.int8, device=layer.weight.device)
        self.register_buffer("semi_structured", code)
        self._packed: tuple[tuple, Tensor] | None = None
        self.register_load_state_dict_post_hook(SemiStructuredLinear._forget_packed)

    @staticmethod
    def _forget_packed(module: nn.Module, keys: Any) -> None:
        module._packed = None  # the loaded weight is packed again at the next CUDA forward

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy, pickle) leave the packed weight behind: it is rebuilt from `weight`."""
        state = super().__getstate__()
        return {**state, "_packed": None}

    @property
    def kernel(self) -> str:
        return list(SEMI_STRUCTURED)[int(self.semi_structured[0])]

    @property
    def dtype(self) -> torch.dtype:
        return {code: dtype for dtype, code in _DTYPE_CODES.items()}[int(self.semi_structured[1])]

    def packed(self) -> Tensor:
        """The weight compressed for the kernel (made once, on the weight's CUDA device)."""
        key = (self.kernel, self.dtype, self.weight.device)
        if self._packed is None or self._packed[0] != key:
            import torch.sparse

            kind = getattr(torch.sparse, SEMI_STRUCTURED[self.kernel][0])
            self._packed = (key, kind.from_dense(self.weight.detach().to(self.dtype).contiguous()))
        return self._packed[1]

    def forward(self, inputs: Tensor) -> Tensor:
        if not inputs.is_cuda:
            return nn.functional.linear(inputs, self.weight, self.bias)
        rows = inputs.reshape(-1, self.in_features).to(self.dtype).contiguous()
        bias = self.bias.to(self.dtype) if self.bias is not None else None
        with torch.autocast("cuda", enabled=False):  # already in the kernel's dtype; the packed weight is no autocast operand
            out = nn.functional.linear(rows, self.packed(), bias)
        return out.reshape(*inputs.shape[:-1], self.out_features).to(inputs.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}, dtype={self.dtype}"

    def dense_layer(self) -> nn.Module:
        return _filled(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None), self.weight, self.bias)


# -- the choice -------------------------------------------------------------------------------


def kernel_candidates(layer: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], nn.Module]]:
    """The sparse kernels a layer may run on `device` with `dtype` activations: CSR always (a
    Linear or 1x1 convolution; a convolution in both its layouts); on CUDA, a 2:4-patterned Linear layer also gets torch's
    semi-structured kernels that take `dtype`."""
    candidates: dict[str, Callable[[], nn.Module]] = {"csr": lambda: sparse_kernel(layer)}
    if not isinstance(layer, nn.Linear):
        candidates["csr per image"] = lambda: sparse_kernel(layer, "csr per image")
    if device.type == "cuda" and isinstance(layer, nn.Linear) and is_two_four(layer.weight):
        for kernel, (_, dtypes) in SEMI_STRUCTURED.items():
            if dtype in dtypes:
                candidates[kernel] = lambda kernel=kernel: SemiStructuredLinear(layer, kernel, dtype)
    return candidates


@dataclass
class KernelChoice:
    """One layer's measurement: milliseconds per kernel on its real input ("dense" first), the
    kernels that could not run here and why, and the pick: the fastest, kept when it is at
    least `MIN_SPEEDUP` faster than dense."""

    layer: str
    sparsity: float
    times: dict[str, float]
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def kernel(self) -> str:
        sparse = {kernel: ms for kernel, ms in self.times.items() if kernel != "dense"}
        if not sparse:
            return "dense"
        fastest = min(sparse, key=sparse.__getitem__)
        return fastest if self.times["dense"] >= MIN_SPEEDUP * sparse[fastest] else "dense"

    @property
    def sparse(self) -> bool:
        return self.kernel != "dense"

    def describe(self) -> str:
        measured = [f"{kernel} {ms:.3f} ms" for kernel, ms in self.times.items()] + [f"{kernel} failed ({why})" for kernel, why in self.failed.items()]
        return f"{self.layer} ({self.sparsity:.0%} zeros) {', '.join(measured)} -> {self.kernel}"


def choose_kernels(model: nn.Module, example: Any, names: list[str], rounds: int, passes: int, warmup: int,
                   precision: PrecisionPolicy | None = None) -> list[KernelChoice]:
    """Time every named layer (Linear or 1x1 convolution) dense and with each of its candidate
    kernels on its real input, interleaved, under the run's precision (autocast) on its device.
    A kernel that fails to build or run here is left out, with the reason."""
    device = next(model.parameters()).device
    autocast = precision.autocast if precision is not None else contextlib.nullcontext
    dtype = precision.dtype if precision is not None else torch.float32
    inputs = layer_inputs(model, example, names)
    modules = dict(model.named_modules())
    choices = []
    for name in names:
        if name not in inputs:  # not on the forward path of this input
            continue
        layer, x = modules[name], inputs[name]
        runners, failed = {"dense": layer}, {}
        for kernel, make in kernel_candidates(layer, device, dtype).items():
            try:
                runner = make()
                with torch.no_grad(), autocast():
                    runner(x)
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:  # e.g. a GPU without 2:4 kernels, a shape they refuse
                failed[kernel] = " ".join(str(error).split())[:160] or type(error).__name__
                continue
            runners[kernel] = runner
        with torch.no_grad(), autocast():
            times = interleaved({kernel: (lambda runner=runner: runner(x)) for kernel, runner in runners.items()}, rounds, passes, warmup, synchronizer(device))
        choices.append(KernelChoice(name, layer_sparsity(layer), times, failed))
    return choices


def apply_kernels(model: nn.Module, kernels: dict[str, str] | list[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace the named layers by their sparse twins, in place: `kernels` maps a layer to the
    kernel chosen for it ('csr', 'csr per image' or a `SEMI_STRUCTURED` one); a list means CSR
    for each."""
    chosen = dict.fromkeys(kernels, "csr") if isinstance(kernels, list) else kernels
    for name, kernel in chosen.items():
        make = (lambda layer, kernel=kernel: SemiStructuredLinear(layer, kernel, dtype)) if kernel in SEMI_STRUCTURED else (lambda layer, kernel=kernel: sparse_kernel(layer, kernel))
        replace_layers(model, [name], make)
    return model


def _placeholder(old: nn.Module, nonzero: int) -> SparseLinear:
    if isinstance(old, nn.Linear):
        return SparseLinear(None, nonzero, tuple(old.weight.shape), old.bias is not None).to(old.weight.device)  # type: ignore[arg-type]
    return SparseConv1x1(old, nonzero).to(old.weight.device)  # type: ignore[arg-type]


def restore_kernels(model: nn.Module, saved: dict[str, tuple[int, ...]]) -> nn.Module:
    """Give `model` the sparse-kernel layers a saved state has (from its tensor names and shapes):
    CSR layers, and 2:4 layers (their kernel and dtype come with the loaded state)."""
    modules = dict(model.named_modules())
    layers = {key[: -len(".col_indices")]: shape[0] for key, shape in saved.items() if key.endswith(".col_indices")}
    for name, nonzero in layers.items():
        layer = modules.get(name)
        if isinstance(layer, CSR_TYPES) and csr_unsupported(layer) is None:
            replace_layers(model, [name], lambda old, nonzero=nonzero: _placeholder(old, nonzero))
    two_four = [key[: -len(".semi_structured")] for key in saved if key.endswith(".semi_structured")]
    replace_layers(model, [name for name in two_four if isinstance(modules.get(name), nn.Linear)], SemiStructuredLinear)
    return model
