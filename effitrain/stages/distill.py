"""`distill`: train a student on its teachers' soft labels (and, optionally, their
intermediate layers) with the one trainer and the loss of `effitrain.distill.loss`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


from omegaconf import DictConfig, OmegaConf
from torch import nn

from effitrain.distill.features import FeatureMatch, parse_pairs
from effitrain.distill.loss import DistillLoss
from effitrain.distill.sources import cache_teacher_outputs, derive_student, resolve_teacher, teacher_source
from effitrain.errors import ConfigError
from effitrain.measure import evaluate
from effitrain.stages.base import Context
from effitrain.stages.train import TrainingStage, make_trainer


@dataclass
class Distill(TrainingStage):
    """Knowledge distillation (Hinton et al. 2015) from one teacher or the mean of several.

    Fields:
        teachers: teacher sources: an earlier stage's name, 'pretrained' (build `teacher_model`
            as configured), a .safetensors file, or a run folder[:STAGE].
        teacher_model: model config for 'pretrained' and .safetensors teachers (null: `model`).
        student: the student's model config; or
        keep_every: derive the student from the first teacher, keeping every k-th layer with
            its weights (DistilBERT-style; models with a list of repeated layers).
        temperature: softening temperature T > 0 (the soft term is scaled by T²).
        alpha: weight of the soft-target term in [0, 1]; the hard-label CE gets 1 - alpha.
        features: intermediate-layer pairs [{student: NAME, teacher: NAME, loss: mse|cosine,
            weight: 1.0}], with a learned projection when widths differ.
        cache_teacher: compute the teachers' logits on the training set once instead of every
            step (needs unaugmented data; not with `features`, which need the teacher's layers).
    """

    kind = "distill"
    teachers: List[str] = field(default_factory=lambda: ["teacher"])
    teacher_model: Optional[Dict[str, Any]] = None
    student: Optional[Dict[str, Any]] = None
    keep_every: Optional[int] = None
    temperature: float = 4.0
    alpha: float = 0.9
    features: List[Dict[str, Any]] = field(default_factory=list)
    cache_teacher: bool = False

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ConfigError("teachers = [] is not allowed (allowed: one or more teacher sources)")
        if self.temperature <= 0:
            raise ConfigError(f"temperature = {self.temperature} is not allowed (allowed: a number > 0)")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha = {self.alpha} is not allowed (allowed: a number in [0, 1])")
        if (self.student is None) == (self.keep_every is None):
            raise ConfigError("student / keep_every: give exactly one (allowed: student = a model config, or keep_every = k to derive it from the teacher)")
        if self.keep_every is not None and self.keep_every < 2:
            raise ConfigError(f"keep_every = {self.keep_every} is not allowed (allowed: an integer >= 2)")
        parse_pairs(self.features, "features")
        if self.cache_teacher and self.features:
            raise ConfigError("cache_teacher = true is not allowed with features (the intermediate layers need the teacher's forward every step)")

    def check(self, cfg: DictConfig, name: str) -> None:
        super().check(cfg, name)
        earlier = list(cfg.stage)[: list(cfg.stage).index(name)]
        for index, source in enumerate(self.teachers):
            teacher_source(source, earlier, f"stage.{name}.teachers[{index}]")

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        where = f"stage.{ctx.stage_name}"
        teacher_cfg = OmegaConf.create(self.teacher_model) if self.teacher_model is not None else None
        self._teachers = [
            resolve_teacher(source, ctx.models, teacher_cfg or ctx.cfg.model, ctx.build_model, f"{where}.teachers[{index}]")
            for index, source in enumerate(self.teachers)
        ]
        if self.keep_every is not None:
            return derive_student(self._teachers[0], self.keep_every, f"{where}.keep_every").to(ctx.device)
        return ctx.build_model(OmegaConf.create(self.student), seeded=True)

    def run(self, name: str, model: nn.Module, ctx: Context) -> nn.Module:
        where = f"stage.{name}"
        features = None
        if self.features:
            example = ctx.data.example_batch(2)
            features = FeatureMatch.build(model, self._teachers[0], parse_pairs(self.features, f"{where}.features"), example, f"{where}.features")
        loss = DistillLoss(self._teachers, self.temperature, self.alpha, features)
        train = ctx.data.train
        if self.cache_teacher:
            train = cache_teacher_outputs(train, loss.teacher_logits, ctx.device, f"{where}.cache_teacher")
        try:
            result = make_trainer(ctx, name, self._overrides(), loss_fn=loss).fit(model, train, ctx.data.val, resume=ctx.resume)
        finally:
            if features is not None:
                features.close()
        teacher_scores = [evaluate(teacher, ctx.data.test, ctx.precision)["accuracy"] for teacher in self._teachers]
        ctx.extra.update({"epochs": result.epochs, "steps": result.steps, "best_val": result.best, "teacher_accuracy": teacher_scores})
        return model
