"""The stage protocol, the context every stage gets, and building a stage from its config."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from effitrain.checkpoint import load_weights, save_weights
from effitrain.config import locate
from effitrain.config.schema import describe_omegaconf_error
from effitrain.data import DataBundle
from effitrain.errors import ConfigError
from effitrain.precision import PrecisionPolicy
from effitrain.runlog import RunLogger


@dataclass
class Context:
    """What a stage may use: never another stage's internals.

    Attributes:
        cfg: the whole composed config.
        precision: precision policy (its `device` is the run device).
        data: the dataset's loaders.
        run_dir: the run folder.
        logger: metrics sink.
        resume: whether this run continues a killed one.
        models: models handed back by earlier stages, by stage name (e.g. a teacher).
        extra: metrics the running stage adds to its ledger row.
        stage_name: the name of the stage being prepared or run (for messages).
    """

    cfg: DictConfig
    precision: PrecisionPolicy
    data: DataBundle
    run_dir: Path
    logger: RunLogger
    resume: bool = False
    models: dict[str, nn.Module] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    stage_name: str = ""

    @property
    def device(self) -> torch.device:
        return self.precision.device

    def build_model(self, model_cfg: Any = None, seeded: bool = False) -> nn.Module:
        """Instantiate `model_cfg` (default: the config's `model`) on the run device.

        With `seeded`, torch's RNG is reset to the run's seed first, so two stages that build
        the same config (a control and a distilled student) start from the same weights.
        """
        if seeded:
            torch.manual_seed(self.cfg.seed)
        return build_model(model_cfg if model_cfg is not None else self.cfg.model).to(self.device)

    def checkpoint_dir(self, stage_name: str) -> Path:
        return self.run_dir / "checkpoints" / stage_name


@dataclass
class Stage:
    """Base class of stages. Subclasses are dataclasses: their fields are the stage's config."""

    kind: ClassVar[str] = "stage"

    def __post_init__(self) -> None:
        """Check field ranges; raise ConfigError naming the field (the builder adds `stage.<name>.`)."""

    def check(self, cfg: DictConfig, name: str) -> None:
        """Check what depends on the whole config (e.g. merged trainer overrides); raise ConfigError."""

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        """Return the model this stage starts from: by default the one handed in."""
        return model

    def run(self, name: str, model: nn.Module, ctx: Context) -> nn.Module:
        """Do the stage's work on `model` and return the resulting model."""
        raise NotImplementedError

    @property
    def model_suffix(self) -> str:
        """File suffix of the saved model (a stage saving another format overrides it)."""
        return ".safetensors"

    def save_model(self, model: nn.Module, path: Path) -> None:
        """Save the stage's resulting model (its size is the ledger's size_bytes)."""
        save_weights(model, path)

    def load_model(self, model: nn.Module, path: Path) -> nn.Module:
        """Load what `save_model` wrote into `model` (a completed stage, on resume)."""
        return load_weights(model, path)


@dataclass
class FromSource(Stage):
    """Mixin (list it first among the bases) for stages that may start from an earlier stage's
    model instead of the incoming one.

    Fields:
        source: the earlier stage whose model (a copy) this stage starts from (null: incoming).
    """

    source: Optional[str] = None

    def check(self, cfg: DictConfig, name: str) -> None:
        super().check(cfg, name)
        earlier = list(cfg.stage)[: list(cfg.stage).index(name)]
        if self.source is not None and self.source not in earlier:
            raise ConfigError(f"stage.{name}.source = {self.source!r}: no such earlier stage (allowed: {', '.join(earlier) or 'none'})")

    def prepare(self, model: nn.Module, ctx: Context) -> nn.Module:
        return copy.deepcopy(ctx.models[self.source]) if self.source is not None else model


def build_stage(name: str, stage_cfg: DictConfig) -> Stage:
    """Build the stage `name` from its config: `_target_` plus the stage class's fields.

    Raises:
        ConfigError: unknown class, unknown field, wrong type or a value out of range.
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
        typed = OmegaConf.merge(OmegaConf.structured(stage_class), params)
        return OmegaConf.to_object(typed)  # type: ignore[return-value]
    except OmegaConfBaseException as error:
        raise ConfigError(describe_omegaconf_error(error, prefix=f"stage.{name}.")) from None
    except ConfigError as error:
        raise ConfigError(f"stage.{name}.{error}") from None


def build_model(model_cfg: Any) -> nn.Module:
    """Instantiate a model config (`_target_` plus arguments), with a one-line error on bad arguments."""
    try:
        model = instantiate(model_cfg)
    except ConfigError:
        raise
    except Exception as error:  # instantiate wraps everything the target raises
        cause = error.__cause__ or error
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(f"model: cannot build {model_cfg.get('_target_')!r} ({str(cause).splitlines()[0]})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_ = {model_cfg.get('_target_')!r} did not return a torch nn.Module")
    if sum(p.numel() for p in model.parameters()) == 0:
        raise ConfigError(f"model: {model_cfg.get('_target_')!r} has no parameters to train")
    return model
