"""Types and ranges of the composed config, checked before any work starts.

The YAML files in `conf/` hold every default (with a comment each); the dataclasses here hold
only types, so a wrong type or unknown key fails in OmegaConf's merge, and `RULES` holds the
allowed ranges. Stages check their own fields (see `effitrain.stages`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from effitrain.errors import ConfigError


@dataclass
class PrecisionConfig:
    policy: str = MISSING
    init_scale: float = MISSING
    growth_interval: int = MISSING
    max_skipped_steps: int = MISSING


@dataclass
class TrainerConfig:
    max_epochs: int = MISSING
    max_steps: Optional[int] = MISSING
    grad_accum_steps: int = MISSING
    grad_clip_norm: Optional[float] = MISSING
    monitor: str = MISSING
    restore_best: bool = MISSING
    early_stopping_patience: Optional[int] = MISSING
    log_every_steps: int = MISSING
    progress: str = MISSING


@dataclass
class SchedulerConfig:
    name: str = MISSING
    warmup_steps: int = MISSING
    min_lr_ratio: float = MISSING


@dataclass
class MeasureConfig:
    batch_size: int = MISSING
    warmup: int = MISSING
    repeats: int = MISSING
    threads: Optional[int] = MISSING


@dataclass
class RootConfig:
    seed: int = MISSING
    device: str = MISSING
    resume: bool = MISSING
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    optimizer: Dict[str, Any] = MISSING
    model: Dict[str, Any] = MISSING
    data: Dict[str, Any] = MISSING
    stage: Dict[str, Any] = MISSING


PRECISION_POLICIES = ("fp32", "fp16", "bf16", "auto")
SCHEDULERS = ("cosine", "linear", "constant")
MONITORS = ("val_accuracy", "val_loss")
PROGRESS = ("auto", "on", "off")

Rule = tuple[str, Callable[[Any], bool], str]

# (dotted key, test, what is allowed). `None` passes for optional keys.
RULES: list[Rule] = [
    ("precision.policy", lambda v: v in PRECISION_POLICIES, f"one of {', '.join(PRECISION_POLICIES)}"),
    ("precision.init_scale", lambda v: v > 0, "a number > 0"),
    ("precision.growth_interval", lambda v: v >= 1, "an integer >= 1"),
    ("precision.max_skipped_steps", lambda v: v >= 1, "an integer >= 1"),
    ("device", lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "auto, cpu, cuda or cuda:N"),
    ("trainer.max_epochs", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.max_steps", lambda v: v >= 1, "an integer >= 1, or null for no step limit"),
    ("trainer.grad_accum_steps", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.grad_clip_norm", lambda v: v > 0, "a number > 0, or null for no clipping"),
    ("trainer.monitor", lambda v: v in MONITORS, f"one of {', '.join(MONITORS)}"),
    ("trainer.early_stopping_patience", lambda v: v >= 1, "an integer >= 1, or null to train every epoch"),
    ("trainer.log_every_steps", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.progress", lambda v: v in PROGRESS, f"one of {', '.join(PROGRESS)}"),
    ("scheduler.name", lambda v: v in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}"),
    ("scheduler.warmup_steps", lambda v: v >= 0, "an integer >= 0"),
    ("scheduler.min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    ("optimizer.lr", lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
    ("optimizer.weight_decay", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),
    ("optimizer.momentum", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
    ("measure.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("measure.warmup", lambda v: v >= 0, "an integer >= 0"),
    ("measure.repeats", lambda v: v >= 10, "an integer >= 10 (latency is a median of at least 10 passes)"),
    ("measure.threads", lambda v: v >= 1, "an integer >= 1, or null for torch's default"),
    ("data.batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("data.eval_batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("data.val_fraction", lambda v: 0 < v < 1, "a number in (0, 1)"),
    ("data.test_fraction", lambda v: 0 < v < 1, "a number in (0, 1)"),
    ("data.num_workers", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
]


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a one-line ConfigError naming `key`, its `value` and what is `allowed` unless `ok`.

    Args:
        ok: whether the value is acceptable.
        key: dotted config key, as a user would override it.
        value: the offending value.
        allowed: what values are allowed, in words.

    Raises:
        ConfigError: when `ok` is false.
    """
    if not ok:
        raise ConfigError(f"{key} = {value!r} is not allowed (allowed: {allowed})")


def describe_omegaconf_error(error: OmegaConfBaseException, prefix: str = "") -> str:
    """Turn an OmegaConf validation error into one line: key, problem."""
    key = f"{prefix}{error.full_key}" if error.full_key else prefix.rstrip(".") or "config"
    message = (error.msg or str(error)).splitlines()[0]
    return f"{key}: {message}"


def validate(cfg: DictConfig) -> None:
    """Check the composed config's types, keys and ranges; raise ConfigError on the first problem.

    Args:
        cfg: the composed config (Hydra's node, not yet resolved).

    Raises:
        ConfigError: one line saying what is wrong, where, and what is allowed.
    """
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RootConfig), cfg)
        OmegaConf.resolve(typed)
        missing = sorted(OmegaConf.missing_keys(typed))
    except OmegaConfBaseException as error:
        raise ConfigError(describe_omegaconf_error(error)) from None
    if missing:
        raise ConfigError(f"{missing[0]}: no value set (every key needs one; see `effitrain show`)")
    for key, test, allowed in RULES:
        value = OmegaConf.select(typed, key, default=None)
        if value is None:
            continue
        try:
            ok = bool(test(value))
        except TypeError:
            ok = False
        require(ok, key, value, allowed)
    if not typed.stage:
        raise ConfigError("stage: the recipe has no stages (add at least one, e.g. /stage@stage.train: train)")
    for name, stage in typed.stage.items():
        if not isinstance(stage, DictConfig) or "_target_" not in stage:
            raise ConfigError(f"stage.{name}: needs a `_target_` naming the stage class (see conf/stage/)")
