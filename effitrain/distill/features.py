"""Intermediate-layer distillation: match named student layers to named teacher layers.

FitNets (Romero et al.) regress a student feature map onto the teacher's through a learned
1x1 convolution when channel counts differ; DistilBERT aligns hidden states with a cosine
loss; TinyBERT maps each student layer to a teacher layer (e.g. student layer i to teacher
layer 2i+1). Here a pair names one module of each model; the module's output is captured by
a forward hook while the trainer computes the loss, and a projection is learned when the
widths differ (Linear for (batch, [tokens,] width), 1x1 Conv2d for (batch, channels, h, w)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from effitrain.batch import forward
from effitrain.errors import ConfigError, not_allowed, require, require_choice

LOSSES = ("mse", "cosine")


@dataclass
class FeaturePair:
    """One matched pair: student module name, teacher module name, loss ('mse'|'cosine'), weight."""

    student: str
    teacher: str
    loss: str = "mse"
    weight: float = 1.0


def parse_pairs(items: Sequence[Any], where: str) -> list[FeaturePair]:
    """Config entries ({student, teacher, loss?, weight?}) as FeaturePairs, with one-line errors."""
    pairs = []
    for index, item in enumerate(items):
        item = dict(item)
        unknown = set(item) - {"student", "teacher", "loss", "weight"}
        if unknown or "student" not in item or "teacher" not in item:
            raise not_allowed(f"{where}[{index}]", item, "{student: NAME, teacher: NAME, loss: mse|cosine, weight: > 0}")
        pair = FeaturePair(str(item["student"]), str(item["teacher"]), str(item.get("loss", "mse")), float(item.get("weight", 1.0)))
        require_choice(f"{where}[{index}].loss", pair.loss, LOSSES)
        require(pair.weight > 0, f"{where}[{index}].weight", pair.weight, "a number > 0")
        pairs.append(pair)
    return pairs


def _output_tensor(output: Any) -> Tensor:
    """The tensor a module returned (first element of tuples and of HF output objects)."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"module returned {type(output).__name__}, not a tensor")


def _module(model: nn.Module, name: str, role: str, where: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        valid = ", ".join(key for key in modules if key)
        raise ConfigError(f"{where}: {role} layer {name!r} does not exist in {type(model).__name__} (valid names: {valid})")
    return modules[name]


def _projection(student_shape: torch.Size, teacher_shape: torch.Size, pair: FeaturePair, where: str) -> nn.Module:
    """Identity when shapes agree; Linear or 1x1 Conv2d when only the width differs; else an error."""
    if student_shape == teacher_shape:
        return nn.Identity()
    if len(student_shape) == len(teacher_shape) and len(student_shape) in (2, 3) and student_shape[:-1] == teacher_shape[:-1]:
        return nn.Linear(student_shape[-1], teacher_shape[-1], bias=False)
    if len(student_shape) == len(teacher_shape) == 4 and student_shape[0] == teacher_shape[0] and student_shape[2:] == teacher_shape[2:]:
        return nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1, bias=False)
    raise ConfigError(
        f"{where}: cannot match student {pair.student!r} output {tuple(student_shape)} to teacher {pair.teacher!r} output "
        f"{tuple(teacher_shape)} (allowed: equal shapes, or shapes that differ only in width: the last dimension of "
        "(batch, [tokens,] width), or channels of (batch, channels, h, w))"
    )


class FeatureMatch(nn.Module):
    """Captures the paired layers' outputs during a training forward and scores their distance.

    Build with `FeatureMatch.build`, which checks every name and shape on an example batch and
    creates the projections; `start()`/`stop()` bracket the forwards whose outputs to capture.
    """

    def __init__(self, pairs: list[FeaturePair], projections: list[nn.Module]) -> None:
        super().__init__()
        self.pairs = pairs
        self.projections = nn.ModuleList(projections)
        self._captured: dict[tuple[str, int], Tensor] = {}
        self._active = False
        self._handles: list[Any] = []

    @classmethod
    def build(cls, student: nn.Module, teacher: nn.Module, pairs: list[FeaturePair], example: Any, where: str) -> "FeatureMatch":
        """Check the pairs on `example` inputs and return a FeatureMatch hooked into both models.

        Raises:
            ConfigError: a layer name that does not exist (listing the valid ones), or shapes
                that no projection can match.
        """
        modules = [(_module(student, pair.student, "student", where), _module(teacher, pair.teacher, "teacher", where)) for pair in pairs]
        shapes: dict[tuple[str, int], torch.Size] = {}
        handles = []
        for index, (student_module, teacher_module) in enumerate(modules):
            for role, module in (("student", student_module), ("teacher", teacher_module)):
                def record(_module: nn.Module, _inputs: Any, output: Any, key: tuple[str, int] = (role, index)) -> None:
                    shapes[key] = _output_tensor(output).shape
                handles.append(module.register_forward_hook(record))
        try:
            with torch.no_grad():
                for model in (student, teacher):
                    was_training = model.training
                    model.eval()
                    forward(model, example)
                    model.train(was_training)
        finally:
            for handle in handles:
                handle.remove()
        projections = [_projection(shapes[("student", i)], shapes[("teacher", i)], pair, where) for i, pair in enumerate(pairs)]
        match = cls(pairs, projections)
        match._hook(modules)
        return match

    def _hook(self, modules: list[tuple[nn.Module, nn.Module]]) -> None:
        for index, pair_modules in enumerate(modules):
            for role, module in zip(("student", "teacher"), pair_modules):
                def capture(_module: nn.Module, _inputs: Any, output: Any, key: tuple[str, int] = (role, index)) -> None:
                    if self._active:
                        self._captured[key] = _output_tensor(output)
                self._handles.append(module.register_forward_hook(capture))

    def start(self) -> None:
        self._captured.clear()
        self._active = True

    def stop(self) -> None:
        self._active = False
        self._captured.clear()

    def loss(self) -> Tensor:
        """Weighted sum over pairs of the distance between projected student and teacher outputs."""
        total: Tensor | None = None
        for index, (pair, projection) in enumerate(zip(self.pairs, self.projections)):
            student = projection(self._captured[("student", index)].float())
            teacher = self._captured[("teacher", index)].detach().float()
            if pair.loss == "mse":
                term = F.mse_loss(student, teacher)
            else:
                dim = 1 if student.dim() == 4 else -1
                term = (1 - F.cosine_similarity(student, teacher, dim=dim)).mean()
            total = pair.weight * term if total is None else total + pair.weight * term
        assert total is not None
        return total

    def close(self) -> None:
        """Remove the hooks from both models (the end of the stage)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
