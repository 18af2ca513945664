"""`train`: fit the model with the one trainer (plain cross-entropy). Also home of
`make_trainer`, which every training-based stage (distill, prune, QAT) uses to get the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from effitrain.config.schema import validate
from effitrain.errors import ConfigError
from effitrain.stages.base import Context, Stage
from effitrain.trainer import Hook, Trainer, TrainerSettings, cross_entropy_loss
from effitrain.trainer.loop import LossFn


def stage_training_config(cfg: DictConfig, name: str, overrides: dict[str, dict]) -> DictConfig:
    """Merge a stage's `trainer`/`optimizer`/`scheduler` overrides onto the global ones and check them.

    Returns:
        The whole config with the stage's overrides applied.

    Raises:
        ConfigError: prefixed with `stage.<name>.` when an override is invalid.
    """
    given = {section: {key: value for key, value in values.items() if value is not None} for section, values in overrides.items()}
    merged = OmegaConf.merge(cfg, {section: values for section, values in given.items() if values})
    try:
        validate(merged)
    except ConfigError as error:
        raise ConfigError(f"stage.{name}.{error}") from None
    return merged


def make_trainer(
    ctx: Context,
    name: str,
    overrides: dict[str, dict],
    loss_fn: LossFn = cross_entropy_loss,
    hooks: Sequence[Hook] = (),
) -> Trainer:
    """The trainer for stage `name`: global trainer/optimizer/scheduler config plus the stage's overrides.

    Args:
        ctx: the stage context.
        name: stage name (logs, checkpoint folder).
        overrides: {"trainer": {...}, "optimizer": {...}, "scheduler": {...}} from the stage config.
        loss_fn: the training loss.
        hooks: per-step hooks.
    """
    cfg = stage_training_config(ctx.cfg, name, overrides)
    settings = TrainerSettings(
        **OmegaConf.to_container(cfg.trainer, resolve=True),  # type: ignore[arg-type]
        scheduler=cfg.scheduler.name,
        warmup_steps=cfg.scheduler.warmup_steps,
        min_lr_ratio=cfg.scheduler.min_lr_ratio,
    )
    optimizer_cfg = cfg.optimizer

    def make_optimizer(params: list[nn.Parameter]) -> Any:
        try:
            return instantiate(optimizer_cfg)(params)
        except Exception as error:  # instantiate wraps import and argument errors
            cause = error.__cause__ or error
            raise ConfigError(f"optimizer: cannot build {optimizer_cfg.get('_target_')!r} ({str(cause).splitlines()[0]})") from None

    return Trainer(
        settings, make_optimizer, ctx.precision, ctx.logger, name, ctx.checkpoint_dir(name), loss_fn=loss_fn, hooks=hooks
    )


@dataclass
class TrainingStage(Stage):
    """Base of stages that train: per-stage overrides of the global training sections.

    Fields:
        trainer, optimizer, scheduler: overrides of the global sections for this stage only
            (null values mean "use the global value").
    """

    trainer: Dict[str, Any] = field(default_factory=dict)
    optimizer: Dict[str, Any] = field(default_factory=dict)
    scheduler: Dict[str, Any] = field(default_factory=dict)

    def check(self, cfg: DictConfig, name: str) -> None:
        stage_training_config(cfg, name, self._overrides())

    def _overrides(self) -> dict[str, dict]:
        return {"trainer": self.trainer, "optimizer": self.optimizer, "scheduler": self.scheduler}


@dataclass
class Train(TrainingStage):
    """Train the model on the training split, validating each epoch.

    Fields:
        model: a model config to train from scratch instead of the model handed in (e.g. a
            control run; initialised from `seed`, like every model a stage builds); null
            continues with the incoming model.
    """

    kind = "train"
    model: Optional[Dict[str, Any]] = None

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        return ctx.build_model(OmegaConf.create(self.model), seeded=True) if self.model is not None else model

    def run(self, name: str, model: nn.Module, ctx: Context) -> nn.Module:
        result = make_trainer(ctx, name, self._overrides()).fit(model, ctx.data.train, ctx.data.val, resume=ctx.resume)
        ctx.extra.update({"epochs": result.epochs, "steps": result.steps, "best_val": result.best})
        return model
