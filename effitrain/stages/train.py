"""`train`: fit the model with the one trainer and the task's loss. Also home of
`make_trainer`, which every training-based stage (distill, prune, QAT, …) uses to get the loop."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn

from effitrain.config.schema import TrainerConfig, merge_training
from effitrain.errors import ConfigError, instantiate_or_explain
from effitrain.layers import matching_modules
from effitrain.stages.base import Context, Prepared, Stage, StageResult
from effitrain.trainer import FitResult, Hook, Trainer
from effitrain.trainer.loop import LossFn


def scheduler_factory(node: DictConfig) -> Callable[[Any, int], Any]:
    """`make(optimizer, total_steps)` from a `scheduler` config: its `_target_` is called with the
    optimizer, and with `total_steps` when it takes that argument (effitrain's and OneCycleLR do)."""
    partial = instantiate_or_explain(node, "scheduler")
    function = getattr(partial, "func", partial)
    try:
        takes_total = "total_steps" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        takes_total = False
    return lambda optimizer, total_steps: partial(optimizer, total_steps=total_steps) if takes_total else partial(optimizer)


def make_trainer(
    ctx: Context,
    name: str,
    overrides: dict[str, dict],
    loss_fn: LossFn | None = None,
    hooks: Sequence[Hook] = (),
    group: Any = None,
    checkpoint_name: str | None = None,
    label: str | None = None,
    task: Any = None,
) -> Trainer:
    """The trainer for stage `name`: global trainer/optimizer/scheduler config plus the stage's overrides.

    Args:
        ctx: the stage context.
        name: stage name (logs, checkpoint folder).
        overrides: {"trainer": {...}, "optimizer": {...}, "scheduler": {...}} from the stage config
            (checked when the stage was built).
        loss_fn: the training loss (default: the task's).
        hooks: per-step hooks.
        group: the processes training this model (default: every process of the run).
        checkpoint_name: its checkpoint folder under checkpoints/ (default: `name`).
        label: added to the terminal's name for it (e.g. "peer 1").
        task: what a batch is and the validation metrics (default: the run's task; a pretext
            task while pre-training).
    """
    sections = merge_training(ctx.cfg, overrides, f"stage.{name}", check=False)
    settings = TrainerConfig(**OmegaConf.to_container(sections.trainer))  # type: ignore[arg-type]
    optimizer = instantiate_or_explain(sections.optimizer, "optimizer")
    return Trainer(
        settings, lambda params: optimizer(params), scheduler_factory(sections.scheduler), ctx.precision, ctx.logger, name,
        ctx.checkpoint_dir(checkpoint_name or name), task=task if task is not None else ctx.task, loss_fn=loss_fn, hooks=hooks,
        label=" ".join(part for part in (ctx.stage_position, name, label) if part), group=group,
    )


@dataclass
class PlannedFit:
    """One planned call of the trainer, for `effitrain show --schedule`: values after each of its
    optimizer steps (index s-1 holds step s), as the run would log them.

    Attributes:
        name: the trainer's stage name (iterative rounds: NAME_roundK).
        epochs, batches: planned epochs and training batches per epoch.
        steps_per_epoch: optimizer steps per epoch (one per global batch, whatever the processes and
            micro-batches it is split into).
        lr: the learning rate after each step.
        values: other per-step values: target_sparsity, kd_weight.
    """

    name: str
    epochs: int
    batches: int
    steps_per_epoch: int
    lr: list[float]
    values: dict[str, list[float]] = field(default_factory=dict)


def plan_fit(cfg: DictConfig, name: str, overrides: dict[str, dict], batches: int) -> PlannedFit:
    """The steps and lr of one fit, from the same trainer settings and scheduler a run builds."""
    import warnings

    import torch

    sections = merge_training(cfg, overrides, f"stage.{name}", check=False)
    settings = TrainerConfig(**OmegaConf.to_container(sections.trainer))  # type: ignore[arg-type]
    per_epoch = batches  # data.batch_size is the global batch of one optimizer step
    steps = settings.max_epochs * per_epoch
    if settings.max_steps is not None:
        steps = min(steps, settings.max_steps)
    optimizer = instantiate_or_explain(sections.optimizer, "optimizer")([torch.nn.Parameter(torch.zeros(1))])
    scheduler = scheduler_factory(sections.scheduler)(optimizer, steps)
    lr = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": nothing is trained here
        for _ in range(steps):
            scheduler.step()
            lr.append(float(scheduler.get_last_lr()[0]))
    return PlannedFit(name, settings.max_epochs, batches, per_epoch, lr)


def fit_metrics(result: FitResult) -> dict[str, Any]:
    """The ledger metrics every training stage reports."""
    return {"epochs": result.epochs, "steps": result.steps, "best_val": result.best, **({"compile": result.compile} if result.compile else {})}


@dataclass
class TrainingStage(Stage):
    """Base of stages that train: per-stage overrides of the global training sections.

    Fields:
        trainer, optimizer, scheduler: overrides of the global sections for this stage only
            (null values mean "use the global value"; conf/stage/_training lists the keys).
    """

    trainer: Dict[str, Any] = field(default_factory=dict)
    optimizer: Dict[str, Any] = field(default_factory=dict)
    scheduler: Dict[str, Any] = field(default_factory=dict)

    def check(self, cfg: DictConfig, name: str) -> None:
        super().check(cfg, name)
        merge_training(cfg, self.training_overrides(), f"stage.{name}")

    def training_overrides(self, **trainer: Any) -> dict[str, dict]:
        """This stage's overrides; keyword arguments override trainer keys for one fit."""
        return {"trainer": {**self.trainer, **trainer}, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def trains(self) -> bool:
        """Whether the stage runs the trainer (stages with `fine_tune: false` may not)."""
        return bool(getattr(self, "fine_tune", True))

    def planned(self, name: str, cfg: DictConfig, batches: int) -> list[PlannedFit]:
        """The fits this stage will run with `batches` training batches per epoch, without training."""
        return [plan_fit(cfg, name, self.training_overrides(), batches)] if self.trains() else []


class KeepEval(Hook):
    """Frozen modules run in eval mode while the rest trains (BatchNorm statistics kept)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def on_epoch_start(self, trainer: Trainer) -> None:
        for module in self.modules:
            module.eval()


class Frozen:
    """Inside: the modules matching `patterns` are not trained (their parameters' gradients off;
    `hooks` keeps them in eval mode for the trainer); restored on the way out, errors included.

    Raises:
        ConfigError: a pattern that matches no module with parameters.
    """

    def __init__(self, model: nn.Module, patterns: list[str], where: str, parameters: Sequence[nn.Parameter] = ()) -> None:
        self.modules = matching_modules(model, list(patterns), where)
        known: dict[int, nn.Parameter] = {id(param): param for module in self.modules for param in module.parameters()}
        known.update({id(param): param for param in parameters})  # more parameters held still (e.g. a head during pre-training)
        self.parameters = list(known.values())
        self.hooks: list[Hook] = [KeepEval(self.modules)] if self.modules else []
        self.count = sum(param.numel() for module in self.modules for param in module.parameters())

    def __enter__(self) -> "Frozen":
        self._trainable = [param.requires_grad for param in self.parameters]
        for param in self.parameters:
            param.requires_grad_(False)
        return self

    def __exit__(self, *exc: Any) -> None:
        for param, was in zip(self.parameters, self._trainable):
            param.requires_grad_(was)


@dataclass
class Train(TrainingStage):
    """Train the model on the training split, validating each epoch.

    Fields:
        model: a model config to train from scratch instead of the model handed in (e.g. a
            control run; initialised from `seed`, like every model a stage builds); null
            continues with the incoming model.
        freeze: module-name patterns this stage leaves as they are: their parameters are not
            trained and they run in eval mode (BatchNorm statistics kept, no dropout); e.g.
            [features] trains only the head on a pre-trained encoder (a linear probe, the first
            half of LP-FT, Kumar et al. 2022); [] trains everything.
    """

    kind = "train"
    model: Optional[Dict[str, Any]] = MISSING
    freeze: List[str] = field(default_factory=list)  # default here as in the YAML, for run folders made before the field

    def keeps_architecture(self) -> bool:
        return self.model is None

    def check_model(self, model: nn.Module, cfg: DictConfig, name: str) -> None:
        if self.model is None:  # a model of its own is built (and its freeze patterns checked) when the stage starts
            Frozen(model, self.freeze, f"stage.{name}.freeze")

    def prepare(self, model: nn.Module, ctx: Context) -> Prepared:
        return Prepared(ctx.build_model(OmegaConf.create(self.model), seeded=True) if self.model is not None else model)

    def run(self, name: str, prepared: Prepared, ctx: Context) -> StageResult:
        with Frozen(prepared.model, self.freeze, f"stage.{name}.freeze") as frozen:
            trainer = make_trainer(ctx, name, self.training_overrides(), hooks=frozen.hooks)
            result = trainer.fit(prepared.model, ctx.data.train, ctx.data.val, resume=ctx.resume)
        metrics = fit_metrics(result)
        if frozen.count:
            metrics["frozen_params"] = frozen.count
        return StageResult(prepared.model, metrics)
