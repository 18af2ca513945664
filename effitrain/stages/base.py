"""The stage protocol, the context every stage gets, and building a stage from its config.

A stage is a dataclass whose fields are its config (types here, defaults in conf/stage/*.yaml).
Per run it goes through: `prepare(model, ctx) -> Prepared` (the model it starts from plus
whatever it needs per run: teachers, example batches, peers), then either
`run(name, prepared, ctx) -> StageResult` (the new model and the ledger row's extra metrics)
or, when the run already completed it, `load_model(prepared, path)`. Nothing per-run is kept
on the stage object, so `load_model` works in any process after `prepare`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from effitrain.checkpoint import load_weights, save_compressed, save_weights
from effitrain.config import locate
from effitrain.config.schema import describe_omegaconf_error
from effitrain.data import DataBundle
from effitrain.errors import ConfigError, instantiate_or_explain, require_choice
from effitrain.precision import PrecisionPolicy
from effitrain.runlog import RunLogger
from effitrain.tasks import Task


@dataclass
class Context:
    """What a stage may use: never another stage's internals.

    Attributes:
        cfg: the whole validated config (resolved).
        precision: precision policy (its `device` is the run device).
        data: the dataset's loaders.
        task: what a batch is, the loss and the metrics.
        run_dir: the run folder.
        logger: metrics sink.
        resume: whether this run continues a killed one.
        models: models handed back by earlier stages, by stage name (e.g. a teacher).
        stage_name: the name of the stage being prepared or run (for messages).
        stage_position: where it stands in the recipe, e.g. "2/5" (for the terminal).
        load_run: rebuilds a saved stage's model from another run folder (run folder, stage or None).
    """

    cfg: DictConfig
    precision: PrecisionPolicy
    data: DataBundle
    task: Task
    run_dir: Path
    logger: RunLogger
    resume: bool = False
    models: dict[str, nn.Module] = field(default_factory=dict)
    stage_name: str = ""
    stage_position: str = ""
    load_run: Optional[Callable[[Path, Optional[str]], nn.Module]] = None

    @property
    def device(self) -> torch.device:
        return self.precision.device

    @property
    def main(self) -> bool:
        """Whether this process writes the run folder (rank 0 of a multi-process run)."""
        from effitrain.parallel.world import is_main

        return is_main()

    def build_model(self, model_cfg: Any = None, seeded: bool = False) -> nn.Module:
        """Instantiate `model_cfg` (default: the config's `model`) on the run device.

        With `seeded`, torch's RNG is reset to the run's seed first, so two stages that build
        the same config (a control and a distilled student) start from the same weights.
        """
        if seeded:
            torch.manual_seed(self.cfg.seed)
        return build_model(model_cfg if model_cfg is not None else self.cfg.model).to(self.device)

    def example_batch(self, size: int) -> Any:
        """`size` test inputs (as the task splits batches), for tracing and timing."""
        return self.data.example_batch(size, split=self.task.split)

    def checkpoint_dir(self, stage_name: str) -> Path:
        return self.run_dir / "checkpoints" / stage_name


@dataclass
class Prepared:
    """What `prepare` hands to `run` and `load_model`: the model the stage starts from. Stages
    that need more per run (teachers, example inputs, peers) subclass it."""

    model: nn.Module


@dataclass
class StageResult:
    """What `run` returns: the resulting model and the metrics its ledger row adds."""

    model: nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stage:
    """Base class of stages. Subclasses are dataclasses: their fields are the stage's config."""

    kind: ClassVar[str] = "stage"
    renamed: ClassVar[dict[str, str]] = {}  # old field name -> new one: configs of older run folders still build
    # In a multi-process run: true runs `run` on every process (a stage that trains: the trainer is
    # data parallel); false runs it on rank 0 alone while the others wait, then they load the model
    # it saved (stages that measure, time or convert). A stage that writes files itself, apart from
    # its trainer's checkpoints, writes them on `ctx.main` only.
    on_every_rank: ClassVar[bool] = True
    # false: the stage's model is not a finished classifier (e.g. pre-training leaves its head
    # untrained), so its row has no task metrics or predictions; the stage reports its own
    reports_task_metrics: ClassVar[bool] = True

    def __post_init__(self) -> None:
        """Check field ranges; raise ConfigError naming the field (the builder adds `stage.<name>.`)."""

    def check(self, cfg: DictConfig, name: str) -> None:
        """Check what depends on the whole validated config and the files the stage will read."""

    def check_model(self, model: nn.Module, cfg: DictConfig, name: str) -> None:
        """Check what depends on the model this stage is handed (layer names, a head), before any
        work: `model` is the recipe's model as built, passed to every stage until the first that
        does not `keep_architecture` (later stages see another model and check in `prepare`).
        Must not change `model`."""

    def keeps_architecture(self) -> bool:
        """Whether the model this stage hands on has the modules of the one it is handed (so the
        stages after it can be checked against the recipe's model)."""
        return False

    def prepare(self, model: nn.Module, ctx: Context) -> Prepared:
        """Return what this stage starts from: by default the model handed in."""
        return Prepared(model)

    def planned(self, name: str, cfg: DictConfig, batches: int) -> list:
        """The trainer calls this stage will make (`effitrain.stages.train.PlannedFit`): none here."""
        return []

    def batches_per_epoch(self, data: DataBundle) -> int:
        """Training batches (optimizer steps) per epoch of this stage's fits: the training loader's."""
        return len(data.train)

    def run(self, name: str, prepared: Prepared, ctx: Context) -> StageResult:
        """Do the stage's work and return the resulting model with its extra ledger metrics."""
        raise NotImplementedError

    @property
    def model_suffix(self) -> str:
        """File suffix of the saved model (a stage saving another format overrides it)."""
        return ".safetensors"

    def compressible(self, model: nn.Module) -> bool:
        """Whether `model` may go in the compressed format (a stage whose models can be in
        another format, e.g. a traced torch.ao graph, says no for those)."""
        return True

    def save_model(self, model: nn.Module, path: Path) -> Path:
        """Save the stage's resulting model (its size is the ledger's size_bytes): in the
        Deep-Compression format (`effitrain.compress.storage`, same name, `.dcz`) when that
        shrinks it, i.e. the model has sparse or shared weights, else `save_plain`. Return the
        file written."""
        if self.compressible(model):
            written = save_compressed(model, path, only_if_smaller=True)
            if written is not None:
                return written
        return self.save_plain(model, path)

    def save_plain(self, model: nn.Module, path: Path) -> Path:
        """Save the model in the stage's own format (safetensors); return the file written
        (`path`, or the same name with another suffix when the model needs it)."""
        save_weights(model, path)
        return path

    def load_model(self, prepared: Prepared, path: Path) -> nn.Module:
        """Rebuild what `save_model` wrote, starting from `prepare`'s result (a completed stage)."""
        return load_weights(prepared.model, path)


@dataclass
class FromSource(Stage):
    """Mixin (list it first among the bases) for stages that may start from an earlier stage's
    model instead of the incoming one.

    Fields:
        source: the earlier stage whose model (a copy) this stage starts from (null: incoming).
    """

    source: Optional[str] = MISSING

    def check(self, cfg: DictConfig, name: str) -> None:
        super().check(cfg, name)
        earlier = list(cfg.stage)[: list(cfg.stage).index(name)]
        if self.source is not None and self.source not in earlier:
            raise ConfigError(f"stage.{name}.source = {self.source!r}: no such earlier stage (allowed: {', '.join(earlier) or 'none'})")

    def starting_model(self, model: nn.Module, ctx: Context) -> nn.Module:
        return copy.deepcopy(ctx.models[self.source]) if self.source is not None else model

    def prepare(self, model: nn.Module, ctx: Context) -> Prepared:
        return Prepared(self.starting_model(model, ctx))


STORAGES = ("auto", "compressed", "plain")


@dataclass
class Stored(Stage):
    """Mixin (list it before the other bases) for stages whose models usually hold sparse or
    shared weights, with a say in how they are stored.

    Fields:
        storage: auto (the Deep-Compression format when it shrinks the model, as every stage
            does) | compressed (refused for a model with nothing sparse or shared) | plain
            (the stage's own format).
    """

    storage: str = "auto"  # default here as in the YAML, for run folders made before this field

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("storage", self.storage, STORAGES)

    def store_candidate(self, model: nn.Module, path: Path) -> Path:
        """Write `model` at `path` (a scratch name) as `save_model` would and return the file: a
        candidate of this stage is ranked by its size. Never refuses: under `compressed`, a model
        the format cannot hold is written plain (the caller sees it by the suffix)."""
        written = None
        if self.storage != "plain" and self.compressible(model):
            written = save_compressed(model, path, only_if_smaller=True)
        return written or self.save_plain(model, path)

    def save_model(self, model: nn.Module, path: Path) -> Path:
        if self.storage == "plain":
            return self.save_plain(model, path)
        if self.storage == "compressed":
            written = save_compressed(model, path, only_if_smaller=True) if self.compressible(model) else None
            if written is None:
                raise ConfigError(f"storage = 'compressed': {type(model).__name__} has no sparse or shared weights the format can hold "
                                  "(allowed: auto, plain)")
            return written
        return super().save_model(model, path)


def build_stage(name: str, stage_cfg: DictConfig) -> Stage:
    """Build the stage `name` from its config: `_target_` plus the stage class's fields.

    Raises:
        ConfigError: unknown class, unknown field, missing value, wrong type or a value out of range.
    """
    target = stage_cfg.get("_target_")
    try:
        stage_class = locate(target)
    except ImportError:
        raise ConfigError(f"stage.{name}._target_ = {target!r}: no such stage class") from None
    if not (isinstance(stage_class, type) and issubclass(stage_class, Stage)):
        raise ConfigError(f"stage.{name}._target_ = {target!r} is not an effitrain Stage")
    try:
        # resolved while still attached to the whole config, so ${data.num_classes} etc. work
        params = {key: value for key, value in OmegaConf.to_container(stage_cfg, resolve=True).items() if key != "_target_"}
        for old, new in stage_class.renamed.items():
            if old in params:
                value = params.pop(old)
                params.setdefault(new, value)
        typed = OmegaConf.merge(OmegaConf.structured(stage_class), params)
        missing = sorted(OmegaConf.missing_keys(typed))
        if missing:
            raise ConfigError(f"{missing[0]}: no value set (a stage built from `_target_` alone has no defaults; "
                              f"use the stage group, e.g. /stage@stage.{name}: {stage_class.kind}, or set it)")
        return OmegaConf.to_object(typed)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise ConfigError(describe_omegaconf_error(error, prefix=f"stage.{name}.")) from None
    except ConfigError as error:
        raise ConfigError(f"stage.{name}.{error}") from None


def build_model(model_cfg: Any) -> nn.Module:
    """Instantiate a model config (`_target_` plus arguments), with a one-line error on bad arguments."""
    model = instantiate_or_explain(model_cfg, "model")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_ = {model_cfg.get('_target_')!r} did not return a torch nn.Module")
    if sum(p.numel() for p in model.parameters()) == 0:
        raise ConfigError(f"model: {model_cfg.get('_target_')!r} has no parameters to train")
    return model
