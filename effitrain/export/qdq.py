"""ONNX for torch.ao static int8 graphs (`backend: x86_static`), as QDQ: the torch.fx graph the
stage converted is rewritten, on a copy, into float ops wrapped in QuantizeLinear /
DequantizeLinear pairs that carry the stage's own scales and zero points, with its int8 weights
behind DequantizeLinear. ONNX Runtime fuses these into its integer kernels (QLinearConv,
QLinearMatMul), so the graph runs as int8 with the stage's calibration, not a new one.

Handled: quantize_per_tensor, dequantize, quantized Conv1d/Conv2d/Linear (with fused ReLU) and
quantized Dropout; anything else quantized is named by `unsupported` and the export is refused.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effitrain.export.onnx_graph import dequantize_weight
from effitrain.layers import run_layer

LAYERS = {"Conv1d": "Conv1d", "ConvReLU1d": "Conv1d", "Conv2d": "Conv2d", "ConvReLU2d": "Conv2d", "Linear": "Linear", "LinearReLU": "Linear"}


@torch.library.custom_op("effitrain::quantize_dequantize", mutates_args=())
def quantize_dequantize(inputs: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Reference of QuantizeLinear -> DequantizeLinear to uint8 with the given scale and zero point."""
    return torch.fake_quantize_per_tensor_affine(inputs, scale.float(), zero_point.int(), 0, 255)


@quantize_dequantize.register_fake
def _(inputs: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return torch.empty_like(inputs)


def translations() -> dict:
    from onnx import TensorProto
    from onnxscript import opset21 as op

    def qdq(inputs, scale, zero_point):  # type: ignore[no-untyped-def]
        offset = op.Cast(zero_point, to=TensorProto.UINT8)
        return op.DequantizeLinear(op.QuantizeLinear(inputs, scale, offset), scale, offset)

    return {torch.ops.effitrain.quantize_dequantize.default: qdq}


def _quantized(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized"))


class QdqLayer(nn.Module):
    """A torch.ao int8 Conv/Linear (optionally with ReLU) as float math on its dequantized int8
    weights, its output re-quantized with the layer's own output scale and zero point."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        name = type(module).__name__
        self.kind, self.relu = LAYERS[name], "ReLU" in name
        weight = module.weight()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scale, zero_point = weight.q_per_channel_scales().float(), weight.q_per_channel_zero_points()
        else:
            scale, zero_point = torch.tensor(weight.q_scale(), dtype=torch.float32), torch.tensor(weight.q_zero_point())
        self.register_buffer("levels", weight.int_repr())
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point.to(torch.int8))
        bias = module.bias() if callable(module.bias) else module.bias
        self.register_buffer("bias", bias.detach().float() if bias is not None else None)
        self.conv = {key: getattr(module, key) for key in ("stride", "padding", "dilation", "groups")} if self.kind != "Linear" else {}
        self.register_buffer("output_scale", torch.tensor(float(module.scale)))
        self.register_buffer("output_zero_point", torch.tensor(int(module.zero_point)))

    def forward(self, inputs: Tensor) -> Tensor:
        outputs = run_layer(self.kind, inputs, dequantize_weight(self.levels, self.scale, self.zero_point, 8, 1), self.bias, self.conv)
        if self.relu:
            outputs = F.relu(outputs)
        return quantize_dequantize(outputs, self.output_scale, self.output_zero_point)


def is_static_int8(model: nn.Module) -> bool:
    return isinstance(model, torch.fx.GraphModule) and any(_quantized(module) for module in model.modules())


def unsupported(model: nn.Module) -> str | None:
    """The first quantized layer or op of a static int8 graph that `qdq_ready` cannot rewrite."""
    for name, module in model.named_modules():
        if _quantized(module) and type(module).__name__ not in (*LAYERS, "Dropout", "LinearPackedParams"):
            return f"its layer {name} is a torch.ao static int8 {type(module).__name__}, which the QDQ rewrite does not cover"
    for node in model.graph.nodes:  # type: ignore[union-attr]
        if node.op == "call_function" and "quantized" in str(getattr(node.target, "__module__", "") or node.target):
            return f"its graph calls {node.target}, which the QDQ rewrite does not cover"
    return None


AVERAGING = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def qdq_ready(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of the static int8 graph with every quantized piece as float + QDQ (see module doc).

    Quantization parameters are followed through the graph: an averaging pool on an int8 tensor
    re-quantizes to its input's grid in torch.ao, so the float graph does the same after it.
    """
    graph_module = copy.deepcopy(model).cpu().eval()
    graph = graph_module.graph
    grids: dict[torch.fx.Node, tuple[torch.fx.Node, torch.fx.Node]] = {}  # int8 tensor -> (scale, zero point) nodes

    def requantize(node: torch.fx.Node, grid: tuple[torch.fx.Node, torch.fx.Node]) -> torch.fx.Node:
        with graph.inserting_after(node):
            replacement = graph.call_function(torch.ops.effitrain.quantize_dequantize.default, (node, *grid))
        node.replace_all_uses_with(replacement, delete_user_cb=lambda user: user is not replacement)
        grids[replacement] = grid
        return replacement

    for node in list(graph.nodes):
        source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            inputs, scale, zero_point, _ = node.args
            with graph.inserting_after(node):
                replacement = graph.call_function(torch.ops.effitrain.quantize_dequantize.default, (inputs, scale, zero_point))
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            grids[replacement] = (scale, zero_point)
        elif node.op == "call_method" and node.target == "dequantize":
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.op == "call_module" and _quantized(module := graph_module.get_submodule(node.target)):
            parent, _, attribute = node.target.rpartition(".")
            owner = graph_module.get_submodule(parent) if parent else graph_module
            if type(module).__name__ in LAYERS:
                setattr(owner, attribute, QdqLayer(module))
                with graph.inserting_before(node):
                    grids[node] = (graph.get_attr(f"{node.target}.output_scale"), graph.get_attr(f"{node.target}.output_zero_point"))
            else:  # quantized dropout: the identity at inference
                setattr(owner, attribute, nn.Identity())
                if source in grids:
                    grids[node] = grids[source]
        elif source in grids and node.op in ("call_module", "call_function", "call_method"):
            grids[node] = grids[source]  # pools, flatten, reshape keep the int8 grid of their input
            if node.op == "call_module" and isinstance(graph_module.get_submodule(node.target), AVERAGING):
                requantize(node, grids[source])
    graph.lint()
    graph_module.recompile()
    return graph_module
