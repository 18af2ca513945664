"""ONNX graphs of effitrain models that keep their integer weights.

torch's ONNX exporter (torch.export + onnxscript) turns float layers into ONNX ops by itself.
effitrain's integer layers are swapped, on a copy of the model, for modules that call custom
torch ops whose ONNX translations carry the stage's own integers and scales:

- x86 dynamic int8 Linear -> per-batch uint8 activations (QuantizeLinear with the 7-bit range
  torch.ao's x86 kernels use) + MatMulInteger over the stage's int8 weights and per-channel scales.
- weight-only int8/int4 Linear/Conv -> DequantizeLinear (per-channel axis 0, int4/uint4 types
  at 4 bits) feeding the float op; int8/int4 embeddings gather integer rows, then rescale.
- clustered (shared) weights -> Gather of the codebook by uint8 indices.
- torch.ao static int8 graphs -> QDQ around float ops (see `qdq.py`).

Nothing is re-quantized: the integers written are the ones the stage saved.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from effitrain.compress.cluster import ClusteredWeight
from effitrain.prune.kernels import SemiStructuredLinear, SparseConv1x1, SparseLinear
from effitrain.layers import replace_layers, run_layer
from effitrain.quant.affine import unpack
from effitrain.quant.weight_only import QuantizedWeight
from effitrain.quant.x86 import DynamicInt8Linear

OPSET = 21  # int4 DequantizeLinear needs 21; ONNX Runtime >= 1.20 runs it


@torch.library.custom_op("effitrain::dynamic_int8_linear", mutates_args=())
def dynamic_int8_linear(inputs: Tensor, weight_t: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Reference of the ONNX translation: int8 weights (stored transposed, in x out) with
    per-output scales; the exported graph quantizes activations to uint8 per call."""
    return inputs @ (weight_t.float() * scale) + bias


@dynamic_int8_linear.register_fake
def _(inputs: Tensor, weight_t: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return inputs.new_empty((*inputs.shape[:-1], weight_t.shape[1]))


@torch.library.custom_op("effitrain::dequantize_weight", mutates_args=())
def dequantize_weight(levels: Tensor, scale: Tensor, zero_point: Tensor, bits: int, signed: int) -> Tensor:
    """Reference of DequantizeLinear along axis 0 (per-channel) or per tensor."""
    shape = (-1,) + (1,) * (levels.dim() - 1) if scale.numel() > 1 else ()
    return (levels.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


@dequantize_weight.register_fake
def _(levels: Tensor, scale: Tensor, zero_point: Tensor, bits: int, signed: int) -> Tensor:
    return torch.empty(levels.shape, dtype=torch.float32, device=levels.device)


@torch.library.custom_op("effitrain::shared_weight", mutates_args=())
def shared_weight(codebook: Tensor, indices: Tensor, shape: list[int]) -> Tensor:
    """Reference of the clustered weight: codebook entries picked by uint8 indices."""
    return codebook[indices.long()].reshape(shape)


@shared_weight.register_fake
def _(codebook: Tensor, indices: Tensor, shape: list[int]) -> Tensor:
    return codebook.new_empty(shape)


def _translations() -> dict[Any, Callable]:
    """onnxscript functions for the custom ops (traced by the exporter)."""
    from onnxscript import opset21 as op
    from onnx import TensorProto

    def dynamic_linear(inputs, weight_t, scale, bias):  # type: ignore[no-untyped-def]
        # per-batch uint8 activations in 0..127, as torch.ao's x86 kernels quantize them
        # (reduce_range), so the graph computes what the stage computed
        width = op.Shape(weight_t, start=0, end=1)
        flat = op.Reshape(inputs, op.Concat(op.Constant(value_ints=[-1]), width, axis=0))
        zero = op.Constant(value_float=0.0)
        low, high = op.Min(op.ReduceMin(flat, keepdims=0), zero), op.Max(op.ReduceMax(flat, keepdims=0), zero)
        step = op.Div(op.Sub(high, low), op.Constant(value_float=127.0))
        step = op.Where(op.Equal(step, zero), op.Constant(value_float=1.0), step)
        offset = op.Cast(op.Clip(op.Round(op.Neg(op.Div(low, step))), zero, op.Constant(value_float=127.0)), to=TensorProto.UINT8)
        levels = op.QuantizeLinear(flat, step, offset)
        product = op.Cast(op.MatMulInteger(levels, weight_t, offset), to=TensorProto.FLOAT)
        outputs = op.Add(op.Mul(product, op.Mul(step, scale)), bias)
        leading = op.Slice(op.Shape(inputs), op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]))
        return op.Reshape(outputs, op.Concat(leading, op.Shape(weight_t, start=1, end=2), axis=0))

    def dequantize(levels, scale, zero_point, bits: int, signed: int):  # type: ignore[no-untyped-def]
        if bits == 4:  # int4/uint4 levels: half a byte each in the file
            target = TensorProto.INT4 if signed else TensorProto.UINT4
            levels, zero_point = op.Cast(levels, to=target), op.Cast(zero_point, to=target)
        return op.DequantizeLinear(levels, scale, zero_point, axis=0)

    def shared(codebook, indices, shape):  # type: ignore[no-untyped-def]
        return op.Reshape(op.Gather(codebook, op.Cast(indices, to=TensorProto.INT64)), op.Constant(value_ints=list(shape)))

    from effitrain.export.qdq import translations as qdq_translations

    return {
        **qdq_translations(),
        torch.ops.effitrain.dynamic_int8_linear.default: dynamic_linear,
        torch.ops.effitrain.dequantize_weight.default: dequantize,
        torch.ops.effitrain.shared_weight.default: shared,
    }


def _integer_dtype(scheme: str) -> torch.dtype:
    return torch.int8 if scheme == "symmetric" else torch.uint8


class OnnxDynamicInt8(nn.Module):
    def __init__(self, layer: DynamicInt8Linear) -> None:
        super().__init__()
        self.register_buffer("weight_t", layer.qweight.t().contiguous())
        self.register_buffer("scale", layer.scale.float())
        self.register_buffer("bias", layer.bias.detach().float())

    def forward(self, inputs: Tensor) -> Tensor:
        return dynamic_int8_linear(inputs, self.weight_t, self.scale, self.bias)


class OnnxWeightOnly(nn.Module):
    def __init__(self, layer: QuantizedWeight) -> None:
        super().__init__()
        self.kind, self.conv, self.bits, self.per_channel = layer.kind, layer.conv, layer.bits, layer.per_channel
        levels = unpack(layer.packed, layer.bits, layer.scheme, layer.shape)
        dtype = _integer_dtype(layer.scheme)
        self.register_buffer("levels", levels.to(dtype))
        self.register_buffer("scale", layer.scale.float().flatten())
        self.register_buffer("zero_point", layer.zero_point.flatten().to(dtype))
        self.bias = layer.bias

    def forward(self, inputs: Tensor) -> Tensor:
        if self.kind == "Embedding":  # integer rows first, then only those rows rescaled
            rows = self.levels[inputs].float()
            if not self.per_channel:
                return (rows - self.zero_point.float()) * self.scale
            return (rows - self.zero_point[inputs].float().unsqueeze(-1)) * self.scale[inputs].unsqueeze(-1)
        weight = dequantize_weight(self.levels, self.scale, self.zero_point, self.bits, int(self.levels.dtype == torch.int8))
        return run_layer(self.kind, inputs, weight, self.bias, self.conv)


class OnnxShared(nn.Module):
    def __init__(self, layer: ClusteredWeight) -> None:
        super().__init__()
        self.kind, self.conv, self.shape = layer.kind, layer.conv, list(layer.shape)
        self.register_buffer("codebook", (layer.codebook * layer.keep).detach())  # a pruned layer's zero centroid held at 0
        self.register_buffer("indices", layer.index_tensor().to(torch.uint8))
        self.bias = layer.bias

    def forward(self, inputs: Tensor) -> Tensor:
        return run_layer(self.kind, inputs, shared_weight(self.codebook, self.indices, self.shape), self.bias, self.conv)


REPLACEMENTS: dict[type, Any] = {DynamicInt8Linear: OnnxDynamicInt8, QuantizedWeight: OnnxWeightOnly, ClusteredWeight: OnnxShared,
                                 SparseLinear: SparseLinear.dense_layer, SparseConv1x1: SparseConv1x1.dense_layer,
                                 SemiStructuredLinear: SemiStructuredLinear.dense_layer}  # ONNX Runtime's CPU Gemm/Conv are dense


def unexportable(model: nn.Module) -> str | None:
    """Why the model has no ONNX graph here (one clause), or None."""
    from effitrain.export import qdq

    if qdq.is_static_int8(model):
        return qdq.unsupported(model)
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.ao.nn.quantized") and not isinstance(module, nn.Embedding):
            return f"its layer {name or '(root)'} is a torch.ao int8 kernel ({type(module).__name__}) outside a static int8 graph"
    return None


def onnx_ready(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval, CPU) with integer layers swapped for their ONNX-translatable twins
    (a static int8 graph rewritten as QDQ)."""
    from effitrain.export import qdq

    if qdq.is_static_int8(model):
        return qdq.qdq_ready(model)  # type: ignore[arg-type]
    copied = copy.deepcopy(model).cpu().eval()
    names = [name for name, module in copied.named_modules() if type(module) in REPLACEMENTS]
    for name in names:
        replace_layers(copied, [name], lambda layer: REPLACEMENTS[type(layer)](layer))
    return copied


def _keeps_integers(node: Any) -> bool | None:
    """Constant-folding rule: never widen stored integers back into floats or int64 in the file
    (DequantizeLinear, Cast of 8-bit levels or indices, a codebook Gather); else the default."""
    from onnx_ir import DataType

    if node.op_type == "DequantizeLinear":
        return False
    source = node.inputs[0].dtype if node.inputs and node.inputs[0] is not None else None
    if node.op_type == "Cast" and source in (DataType.INT8, DataType.UINT8) and node.attributes["to"].as_int() not in (DataType.INT4, DataType.UINT4):
        return False
    if node.op_type == "Gather" and source == DataType.FLOAT:
        return False
    return None


def write_onnx(module: nn.Module, example: tuple[Tensor, ...], input_names: list[str], path: Path) -> None:
    """Export `module` (a LogitsOnly: *tensors in, logits out) to `path` with a dynamic batch axis;
    the graph is optimised (shapes, constants) without folding integer weights back to float."""
    import warnings

    from onnxscript.optimizer import optimize_ir

    batch = torch.export.Dim("batch", min=1)  # one dynamic axis per tensor of LogitsOnly's *tensors
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, example, input_names=input_names, output_names=["logits"], dynamo=True, opset_version=OPSET,
            dynamic_shapes=(tuple({0: batch} for _ in example),), custom_translation_table=_translations(), verbose=False,
            optimize=False,
        )
    folding = logging.getLogger("onnxscript")
    level = folding.level
    folding.setLevel(logging.ERROR)  # it warns about each shape it cannot fold; the graph is checked by running it
    try:
        optimize_ir(program.model, should_fold=_keeps_integers)
    finally:
        folding.setLevel(level)
    for node in program.model.graph.all_nodes():  # the exporter's per-node stack traces would be most of a small file
        node.metadata_props.clear()
        node.doc_string = None
    program.save(str(path), external_data=False)
