"""`pretrain`: self-supervised pre-training of the model's encoder with the one trainer, labels
never read (`effitrain.selfsup`): SimCLR on images, masked-language-model on texts. The row
reports the pretext loss and a k-NN accuracy of the representation instead of a classifier's
accuracy: the head is left as it was, for the next stage (e.g. `train` on a fraction of the
labels) to fine-tune with the encoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional

from omegaconf import MISSING, DictConfig
from torch import nn
from torch.utils.data import DataLoader

from effitrain.data.bundle import SeededShuffle, _Transformed, build_augment
from effitrain.errors import ConfigError, require, require_choice
from effitrain.parallel import world as parallel
from effitrain.selfsup.encoder import Encoder, find_encoder, representation_size
from effitrain.selfsup.probe import features_of, knn_accuracy
from effitrain.stages.base import Context, Prepared, StageResult
from effitrain.stages.train import Frozen, TrainingStage, fit_metrics, make_trainer
from effitrain.trainer import Hook

METHODS = ("auto", "simclr", "mlm")
SIMCLR_EXAMPLE = ("[{_target_: torchvision.transforms.v2.RandomResizedCrop, size: H, scale: [0.3, 1.0]}, "
                  "{_target_: torchvision.transforms.v2.RandomApply, transforms: [{_target_: torchvision.transforms.v2.ColorJitter, "
                  "brightness: 0.4, contrast: 0.4}], p: 0.8}] (SimCLR's crop and colour distortion; "
                  "recipes/ssl_digits.yaml has one for 8x8 digits)")


class HeadWarmup(Hook):
    """For the first `steps` optimizer steps only the loss's own parameters (the pretext head)
    are updated: the model's gradients are dropped before the step (None: the optimizer skips
    them, weight decay included)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def after_backward(self, trainer: Any) -> None:
        if trainer.step < self.steps:
            for param in trainer.model.parameters():
                param.grad = None


@dataclass
class PreparedPretrain(Prepared):
    """The model and where its representation is."""

    encoder: Encoder


def _raw(dataset: Any) -> Any:
    """The dataset without the training augmentation wrapper (views are drawn instead)."""
    return dataset.dataset if isinstance(dataset, _Transformed) else dataset


@dataclass
class Pretrain(TrainingStage):
    """Pre-train the model's encoder on the whole training split without labels.

    Fields:
        method: auto (mlm for text data with a tokenizer, simclr for images) | simclr | mlm.
        head: the module whose input is the representation; auto finds it (see
            `effitrain.selfsup.encoder`). The head is not trained here.
        views: simclr: transforms v2 configs drawing one random view of an image (null: the
            data's `augment`; one of them is required).
        temperature: simclr: NT-Xent's T > 0.
        projection_dim: simclr: the projection head's width (the head is dropped afterwards).
        mask_probability: mlm: the share of tokens masked, in (0, 1).
        knn_k: neighbours of the k-NN probe that scores the representation for the row.
        batch_size: the global batch while pre-training (null: data.batch_size); contrastive
            learning gains from more negatives than a supervised batch holds.
        head_warmup_steps: optimizer steps at the start in which only the pretext head (the
            projection or masked-LM head, new at every pretrain stage) learns: the model's own
            gradients are dropped, so a new head's random errors do not reach a pretrained encoder.
    """

    kind = "pretrain"
    reports_task_metrics: ClassVar[bool] = False  # its model's head is untrained: the row has k-NN figures instead
    method: str = MISSING
    head: str = MISSING
    views: Optional[List[Dict[str, Any]]] = MISSING
    temperature: float = MISSING
    projection_dim: int = MISSING
    mask_probability: float = MISSING
    knn_k: int = MISSING
    batch_size: Optional[int] = MISSING
    head_warmup_steps: int = MISSING

    def __post_init__(self) -> None:
        require_choice("method", self.method, METHODS)
        require(self.temperature > 0, "temperature", self.temperature, "a number > 0")
        require(self.projection_dim >= 1, "projection_dim", self.projection_dim, "an integer >= 1")
        require(0 < self.mask_probability < 1, "mask_probability", self.mask_probability, "a probability in (0, 1)")
        require(self.knn_k >= 1, "knn_k", self.knn_k, "an integer >= 1")
        require(self.head_warmup_steps >= 0, "head_warmup_steps", self.head_warmup_steps, "an integer >= 0")
        if self.batch_size is not None:
            require(self.batch_size >= 2, "batch_size", self.batch_size, "an integer >= 2 (pairs of views need other images), or null")

    def resolved(self, cfg: DictConfig) -> str:
        """The method this stage runs on this data."""
        if self.method != "auto":
            return self.method
        return "mlm" if cfg.data.get("tokenizer") else "simclr"

    def view_configs(self, cfg: DictConfig) -> list:
        return list(self.views) if self.views else list(cfg.data.get("augment") or [])

    def check(self, cfg: DictConfig, name: str) -> None:
        super().check(cfg, name)
        method, where = self.resolved(cfg), f"stage.{name}"
        if method == "mlm" and not cfg.data.get("tokenizer"):
            raise ConfigError(f"{where}.method = 'mlm' needs text data with a tokenizer (data.tokenizer); data "
                              f"{cfg.data.get('_target_')!r} has none (allowed: simclr, auto)")
        if method == "simclr":
            if cfg.data.get("tokenizer"):
                raise ConfigError(f"{where}.method = 'simclr' draws random views of images; data {cfg.data.get('_target_')!r} is text "
                                  "(allowed: mlm, auto)")
            if not self.view_configs(cfg):
                raise ConfigError(f"{where}.views: SimCLR learns from two random views of each image and none is defined (views is "
                                  f"null and data.augment is empty) (allowed: a list of transforms v2, e.g. {SIMCLR_EXAMPLE})")
            try:
                build_augment(self.view_configs(cfg))
            except ConfigError as error:
                raise ConfigError(f"{where}.views: {str(error).split(': ', 1)[-1]}") from None

    def keeps_architecture(self) -> bool:
        return True  # the pretext head lives in the loss, not in the model

    def check_model(self, model: nn.Module, cfg: DictConfig, name: str) -> None:
        find_encoder(model, self.head, cfg.data.num_classes, f"stage.{name}.head")

    def batches_per_epoch(self, data: Any) -> int:
        examples, batch = len(data.every_train.dataset), self.batch_size or data.every_train.batch_size
        return -(-examples // batch)  # every training example, labelled or not, in this stage's batches

    def prepare(self, model: nn.Module, ctx: Context) -> PreparedPretrain:
        return PreparedPretrain(model, find_encoder(model, self.head, ctx.data.num_classes, f"stage.{ctx.stage_name}.head"))

    def run(self, name: str, prepared: PreparedPretrain, ctx: Context) -> StageResult:  # type: ignore[override]
        model, encoder, where = prepared.model, prepared.encoder, f"stage.{name}"
        method = self.resolved(ctx.cfg)
        unlabeled, val = ctx.data.every_train, ctx.data.val
        if method == "simclr":
            from effitrain.selfsup.contrastive import Contrastive, SimCLR, TwoViews

            width = representation_size(encoder, model, ctx.example_batch(2))
            objective: nn.Module = SimCLR(encoder, width, self.projection_dim, self.temperature, parallel.whole())
            task: Any = Contrastive(objective)  # type: ignore[arg-type]
            collate: Any = TwoViews(build_augment(self.view_configs(ctx.cfg)))
        else:
            from effitrain.models.hf import load_tokenizer
            from effitrain.selfsup.masked import MaskedLM, MaskedText, Masking

            objective = MaskedLM(model, where)
            task = MaskedText(objective)  # type: ignore[arg-type]
            collate = Masking(load_tokenizer(ctx.cfg.data.tokenizer, ctx.cfg.data.get("offline", True)), self.mask_probability)
        seed = unlabeled.sampler.seed if isinstance(unlabeled.sampler, SeededShuffle) else int(ctx.cfg.seed)
        dataset = _raw(unlabeled.dataset)
        train = DataLoader(dataset, batch_size=self.batch_size or unlabeled.batch_size, sampler=SeededShuffle(len(dataset), seed),
                           collate_fn=collate, num_workers=unlabeled.num_workers)
        scored = DataLoader(_raw(val.dataset), batch_size=val.batch_size, collate_fn=collate)
        hooks = [HeadWarmup(self.head_warmup_steps)] if self.head_warmup_steps else []
        with Frozen(model, [], f"{where}.head", encoder.head_parameters(model)):  # the classification head stays as it was
            trainer = make_trainer(ctx, name, self.training_overrides(monitor="val_loss"), loss_fn=objective, task=task, hooks=hooks)
            result = trainer.fit(model, train, scored, resume=ctx.resume)
        bank = features_of(encoder, model, ctx.data.train, ctx.task.split, ctx.precision)
        scores = {}
        for split, loader in (("val_knn_accuracy", ctx.data.val), ("knn_accuracy", ctx.data.test)):
            queries = features_of(encoder, model, loader, ctx.task.split, ctx.precision)
            scores[split] = knn_accuracy(*bank, *queries, self.knn_k, ctx.data.num_classes)
        metrics = fit_metrics(result)
        best = metrics.pop("best_val")
        return StageResult(model, {**metrics, "method": method, "pretrain_val_loss": best, **scores,
                                   "knn_labels": len(bank[1]), "encoder": encoder.describe(model)})
