"""`distill`: train a student on its teachers' soft labels (and, optionally, their
intermediate layers) with the one trainer and the loss of `effitrain.distill.loss`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn

from effitrain.compress.embeddings import factorize_embeddings, token_ids, trim_vocabulary
from effitrain.distill.features import FeatureMatch, parse_pairs
from effitrain.distill.loss import DistillLoss
from effitrain.distill.sources import cache_teacher_outputs, derive_student, resolve_teacher, teacher_source
from effitrain.errors import ConfigError, not_allowed, require, require_choice
from effitrain.stages.base import Context, Prepared, StageResult
from effitrain.stages.train import PlannedFit, TrainingStage, fit_metrics, make_trainer


def _check_run(path: Path, stage: Optional[str]) -> str:
    from effitrain.runs import completed_stage  # runs imports the stages: import when needed

    return completed_stage(path, stage)


VOCAB = ("full", "trim")


@dataclass
class PreparedStudent(Prepared):
    """The student (`model`) and the teachers it learns from."""

    teachers: List[nn.Module]
    embeddings: Dict[str, Any]


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
        vocab: 'full', or 'trim': the student keeps only the word-embedding rows of tokens in
            the training data plus the tokenizer's special tokens (others read as [UNK]); it
            still takes the tokenizer's ids (`effitrain.compress.embeddings`).
        embedding_rank: factorise the student's word embeddings into V x r rows and an r x d
            projection (SVD-initialised, fine-tuned here); null keeps them whole.
    """

    kind = "distill"
    teachers: List[str] = MISSING
    teacher_model: Optional[Dict[str, Any]] = MISSING
    student: Optional[Dict[str, Any]] = MISSING
    keep_every: Optional[int] = MISSING
    temperature: float = MISSING
    alpha: float = MISSING
    features: List[Dict[str, Any]] = MISSING
    cache_teacher: bool = MISSING
    vocab: str = "full"  # defaults here as in the YAML, for run folders made before these fields
    embedding_rank: Optional[int] = None

    def __post_init__(self) -> None:
        require(bool(self.teachers), "teachers", self.teachers, "one or more teacher sources")
        require(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        require(0 <= self.alpha <= 1, "alpha", self.alpha, "a number in [0, 1]")
        if (self.student is None) == (self.keep_every is None):
            raise ConfigError("student / keep_every: give exactly one (allowed: student = a model config, or keep_every = k to derive it from the teacher)")
        if self.keep_every is not None:
            require(self.keep_every >= 2, "keep_every", self.keep_every, "an integer >= 2")
        parse_pairs(self.features, "features")
        if self.cache_teacher and self.features:
            raise not_allowed("cache_teacher", self.cache_teacher, "false when features are set (the intermediate layers need the teacher's forward every step)")
        require_choice("vocab", self.vocab, VOCAB)
        if self.embedding_rank is not None:
            require(self.embedding_rank >= 1, "embedding_rank", self.embedding_rank, "an integer >= 1, or null")

    def check(self, cfg: DictConfig, name: str) -> None:
        super().check(cfg, name)
        earlier = list(cfg.stage)[: list(cfg.stage).index(name)]
        for index, source in enumerate(self.teachers):
            teacher_source(source, earlier, f"stage.{name}.teachers[{index}]", check_run=_check_run)
        if self.vocab == "trim" and not cfg.data.get("tokenizer"):
            raise ConfigError(f"stage.{name}.vocab = 'trim': needs text data with a tokenizer (data.tokenizer); "
                              f"data {cfg.data.get('_target_')!r} has none (allowed: full)")

    def prepare(self, model: nn.Module, ctx: Context) -> PreparedStudent:
        where = f"stage.{ctx.stage_name}"
        teacher_cfg = OmegaConf.create(self.teacher_model) if self.teacher_model is not None else None
        teachers = [
            resolve_teacher(source, ctx.models, teacher_cfg or ctx.cfg.model, ctx.build_model, ctx.load_run, f"{where}.teachers[{index}]")
            for index, source in enumerate(self.teachers)
        ]
        if self.keep_every is not None:
            student = derive_student(teachers[0], self.keep_every, f"{where}.keep_every").to(ctx.device)
        else:
            student = ctx.build_model(OmegaConf.create(self.student), seeded=True)
        return PreparedStudent(student, teachers, self.shrink_embeddings(student, ctx, where))

    def shrink_embeddings(self, student: nn.Module, ctx: Context, where: str) -> Dict[str, Any]:
        """Trim and/or factorise the student's word embeddings in place; what was kept, for the ledger.

        The kept tokens depend only on the training split, so a resumed run or a model rebuilt
        from the run folder gets the same table.
        """
        notes: Dict[str, Any] = {}
        if self.vocab == "trim":
            from effitrain.models.hf import load_tokenizer

            tokenizer = load_tokenizer(ctx.cfg.data.tokenizer, ctx.cfg.data.get("offline", True))
            if tokenizer.unk_token_id is None:
                raise ConfigError(f"{where}.vocab = 'trim': the tokenizer has no [UNK] token for the tokens it drops (allowed: full)")
            seen = token_ids((ctx.task.split(batch)[0] for batch in ctx.data.train), f"{where}.vocab")
            notes.update(trim_vocabulary(student, [*seen.tolist(), *tokenizer.all_special_ids], tokenizer.unk_token_id, f"{where}.vocab"))
        if self.embedding_rank is not None:
            notes.update(factorize_embeddings(student, self.embedding_rank, f"{where}.embedding_rank"))
        return notes

    def planned(self, name: str, cfg: DictConfig, batches: int) -> list[PlannedFit]:
        fits = super().planned(name, cfg, batches)
        for fit in fits:
            fit.values["kd_weight"] = [self.alpha] * len(fit.lr)
        return fits

    def run(self, name: str, prepared: PreparedStudent, ctx: Context) -> StageResult:  # type: ignore[override]
        where = f"stage.{name}"
        model, teachers = prepared.model, prepared.teachers
        features = None
        if self.features:
            features = FeatureMatch.build(model, teachers[0], parse_pairs(self.features, f"{where}.features"), ctx.example_batch(2), f"{where}.features")
        loss = DistillLoss(teachers, self.temperature, self.alpha, features)
        train = ctx.data.train
        if self.cache_teacher:
            train = cache_teacher_outputs(train, loss.teacher_logits, ctx.device, f"{where}.cache_teacher", split=ctx.task.split)
        try:
            result = make_trainer(ctx, name, self.training_overrides(), loss_fn=loss).fit(model, train, ctx.data.val, resume=ctx.resume)
        finally:
            if features is not None:
                features.close()
        teacher_scores = [ctx.task.evaluate(teacher, ctx.data.test, ctx.precision)["accuracy"] for teacher in teachers]
        return StageResult(model, {**fit_metrics(result), "teacher_accuracy": teacher_scores, **prepared.embeddings})
