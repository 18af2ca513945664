"""Types and ranges of the composed config, checked once before any work starts.

One shape for every group and stage kind: the YAML files in `conf/` hold every default (with a
comment each); the dataclasses here (and each stage class) hold only types, with MISSING
defaults, so a wrong type or unknown key fails in OmegaConf's merge and no default can drift
between a YAML file and a class. `RUNTIMES = ("torch", "onnxruntime")  # where the ledger's latency_ms is timed

RULES` holds the allowed ranges.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from effitrain.errors import ConfigError, require


@dataclass
class PrecisionConfig:
    policy: str = MISSING
    init_scale: float = MISSING
    growth_interval: int = MISSING
    max_skipped_steps: int = MISSING


@dataclass
class TrainerConfig:
    """The one training loop's settings (defaults: conf/trainer/default.yaml)."""

    max_epochs: int = MISSING
    max_steps: Optional[int] = MISSING
    grad_accum_steps: int = MISSING
    grad_clip_norm: Optional[float] = MISSING
    monitor: str = MISSING
    restore_best: bool = MISSING
    early_stopping_patience: Optional[int] = MISSING
    log_every_steps: int = MISSING
    progress: str = MISSING
    compile: Any = False  # true | false | auto (a bool or the word; default for configs made before the key)
    # (defaults here for run folders made before these keys existed)
    devices: int = 1
    sync_batchnorm: bool = False
    dist_backend: str = "auto"
    dist_port: Optional[int] = None
    dist_timeout_s: float = 1800.0

    @classmethod
    def with_defaults(cls, **settings: Any) -> "TrainerConfig":
        """The YAML defaults (conf/trainer/default.yaml) with `settings` applied, for Python callers."""
        from effitrain.config import group_defaults

        return cls(**{**group_defaults("trainer", "default"), **settings})


@dataclass
class MeasureConfig:
    batch_size: int = MISSING
    warmup: int = MISSING
    repeats: int = MISSING
    threads: Optional[int] = MISSING
    runtime: str = "torch"  # also what run folders made before this key existed were timed in
    final_retime: bool = True  # (defaults here only for run folders made before these keys existed)
    rounds: int = 5


@dataclass
class ObjectiveConfig:
    metric: str = MISSING
    direction: str = MISSING
    stage: Optional[str] = None


@dataclass
class RootConfig:
    seed: int = MISSING
    device: str = MISSING
    resume: bool = MISSING
    report: bool = MISSING
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    objective: List[ObjectiveConfig] = MISSING
    scheduler: Dict[str, Any] = MISSING
    optimizer: Dict[str, Any] = MISSING
    task: Dict[str, Any] = MISSING
    model: Dict[str, Any] = MISSING
    data: Dict[str, Any] = MISSING
    stage: Dict[str, Any] = MISSING


PRECISION_POLICIES = ("fp32", "fp16", "bf16", "auto")
PROGRESS = ("auto", "on", "off")
DIST_BACKENDS = ("auto", "gloo", "nccl")
# trainer keys of the whole run (how many processes, how they talk): not overridable per stage
RUN_TRAINER_KEYS = ("devices", "dist_backend", "dist_port", "dist_timeout_s")
DATA_OPTIONS = ("mix", "label_fraction")  # data keys effitrain applies to whatever the builder returns (not the builder's arguments)
DIRECTIONS = ("maximize", "minimize")
# What a stage may override per stage (stage.<name>.trainer / optimizer / scheduler); null = global value.
STAGE_OPTIMIZER_KEYS = ("lr", "weight_decay")
STAGE_SCHEDULER_KEYS = ("warmup_steps", "min_lr_ratio")
TRAINING_SECTIONS = ("trainer", "optimizer", "scheduler")

Rule = tuple[str, Callable[[Any], bool], str]

# (dotted key, test, what is allowed). `None` passes for optional keys and absent ones.
RUNTIMES = ("torch", "onnxruntime")  # where the ledger's latency_ms is timed

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
    ("trainer.monitor", lambda v: v.startswith("val_"), "val_<a metric of the task>, e.g. val_accuracy or val_loss"),
    ("trainer.early_stopping_patience", lambda v: v >= 1, "an integer >= 1, or null to train every epoch"),
    ("trainer.log_every_steps", lambda v: v >= 1, "an integer >= 1"),
    ("trainer.progress", lambda v: v in PROGRESS, f"one of {', '.join(PROGRESS)}"),
    ("trainer.compile", lambda v: isinstance(v, bool) or v == "auto", "true, false or auto"),
    ("trainer.devices", lambda v: v >= 1, "an integer >= 1 (processes, one per GPU on CUDA)"),
    ("trainer.dist_backend", lambda v: v in DIST_BACKENDS, ", ".join(DIST_BACKENDS)),
    ("trainer.dist_port", lambda v: 1 <= v <= 65535, "a port number in 1..65535, or null for a free one"),
    ("trainer.dist_timeout_s", lambda v: v > 0, "a number of seconds > 0"),
    ("scheduler.warmup_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("scheduler.min_lr_ratio", lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "a number in [0, 1]"),
    ("optimizer.lr", lambda v: isinstance(v, (int, float)) and v > 0, "a number > 0"),
    ("optimizer.weight_decay", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0"),
    ("optimizer.momentum", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)"),
    ("measure.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("measure.warmup", lambda v: v >= 0, "an integer >= 0"),
    ("measure.repeats", lambda v: v >= 10, "an integer >= 10 (latency is a median of at least 10 passes)"),
    ("measure.threads", lambda v: v >= 1, "an integer >= 1, or null for torch's default"),
    ("measure.runtime", lambda v: v in RUNTIMES, ", ".join(RUNTIMES)),
    ("measure.rounds", lambda v: v >= 1, "an integer >= 1"),
    ("data.batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("data.eval_batch_size", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("data.val_fraction", lambda v: 0 < v < 1, "a number in (0, 1)"),
    ("data.test_fraction", lambda v: 0 < v < 1, "a number in (0, 1)"),
    ("data.num_workers", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
]


def describe_omegaconf_error(error: OmegaConfBaseException, prefix: str = "") -> str:
    """Turn an OmegaConf validation error into one line: key, problem."""
    key = f"{prefix}{error.full_key}" if error.full_key else prefix.rstrip(".") or "config"
    message = (error.msg or str(error)).splitlines()[0]
    return f"{key}: {message}"


def _check_rules(typed: DictConfig, sections: tuple[str, ...] | None = None) -> None:
    for key, test, allowed in RULES:
        if sections is not None and key.split(".")[0] not in sections:
            continue
        value = OmegaConf.select(typed, key, default=None)
        if value is None:
            continue
        try:
            ok = bool(test(value))
        except TypeError:
            ok = False
        require(ok, key, value, allowed)


def _unresolvable(node: Any, prefix: str = "") -> tuple[str, Any] | None:
    """(dotted key, raw text) of the first value under `node` whose interpolation fails
    (OmegaConf's resolve() does not say which)."""
    keys = list(node.keys()) if isinstance(node, DictConfig) else range(len(node)) if OmegaConf.is_list(node) else []
    for key in keys:
        where = f"{prefix}{key}" if isinstance(key, str) else f"{prefix.rstrip('.')}[{key}]"
        try:
            value = node[key]
        except OmegaConfBaseException:
            return where, node._get_node(key)._value()
        if OmegaConf.is_config(value):
            found = _unresolvable(value, f"{where}.")
            if found:
                return found
    return None


def typed_config(cfg: DictConfig) -> DictConfig:
    """`cfg` merged onto the schema and resolved (types checked); ConfigError on the first problem."""
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RootConfig), cfg)
        OmegaConf.resolve(typed)
        missing = sorted(OmegaConf.missing_keys(typed))
    except OmegaConfBaseException as error:
        found = _unresolvable(cfg) if not error.full_key and "Interpolation" in type(error).__name__ else None
        if found is not None:
            raise ConfigError(f"{found[0]} = {found[1]!r}: {(error.msg or str(error)).splitlines()[0]} "
                              "(allowed: keys the composed config has; see `effitrain show`)") from None
        raise ConfigError(describe_omegaconf_error(error)) from None
    if missing:
        raise ConfigError(f"{missing[0]}: no value set (every key needs one; see `effitrain show`)")
    return typed


def validate(cfg: DictConfig, targets: bool = True) -> DictConfig:
    """Check the composed config's types, keys and ranges.

    Args:
        cfg: the composed config (Hydra's node, not yet resolved).
        targets: also check the `_target_` arguments of data, optimizer, scheduler and task
            against their signatures (imports them: `effitrain show` skips it to stay torch-free).

    Returns:
        The typed, resolved config.

    Raises:
        ConfigError: one line saying what is wrong, where, and what is allowed.
    """
    if not isinstance(cfg.get("model"), DictConfig) or "_target_" not in cfg.model:
        raise ConfigError("model: no model chosen (allowed: model=bert|cnn|mlp|torchvision, or `model: {_target_: your.Class, ...}` in your recipe)")
    if not isinstance(cfg.get("data"), DictConfig) or "_target_" not in cfg.data:
        raise ConfigError("data: no data set chosen (allowed: data=digits|synthetic|bbcnews|text|..., or `data: {_target_: your.builder, ...}` in your recipe)")
    typed = typed_config(cfg)
    _check_rules(typed)
    if not typed.stage:
        raise ConfigError("stage: the recipe has no stages (add at least one, e.g. /stage@stage.train: train)")
    for name, stage in typed.stage.items():
        if not isinstance(stage, DictConfig) or "_target_" not in stage:
            raise ConfigError(f"stage.{name}: needs a `_target_` naming the stage class (see conf/stage/)")
    for index, objective in enumerate(typed.objective):
        require(objective.direction in DIRECTIONS, f"objective[{index}].direction", objective.direction, ", ".join(DIRECTIONS))
        if objective.stage is not None:
            require(objective.stage in typed.stage, f"objective[{index}].stage", objective.stage, ", ".join(typed.stage))
    if targets:
        check_call(OmegaConf.masked_copy(typed.data, [key for key in typed.data if key not in DATA_OPTIONS]), "data")
        for section in ("optimizer", "scheduler", "task"):
            check_call(typed[section], section)
        check_data_files(typed.data)
    return typed


def check_data_files(data: DictConfig) -> None:
    """The files effitrain's own data builders will read exist (`path`: a file, `root`: a folder,
    unless `download` fetches it), so a typo stops before a run folder exists. A user's builder
    checks its own inputs.

    Raises:
        ConfigError: the first missing file or folder.
    """
    from pathlib import Path

    if not str(data.get("_target_", "")).startswith("effitrain.data.") or data.get("download"):
        return
    path, root = data.get("path"), data.get("root")
    if path is not None and not Path(str(path)).expanduser().is_file():
        raise ConfigError(f"data.path = {str(path)!r}: no such file (allowed: an existing .csv or .jsonl file)")
    if root is not None and not Path(str(root)).expanduser().is_dir():
        hint = "; or data.download=true, which needs a network" if "download" in data else ""
        raise ConfigError(f"data.root = {str(root)!r}: no such folder (allowed: a folder holding the data{hint})")


def merge_training(typed: DictConfig, overrides: dict[str, dict], where: str, check: bool = True) -> DictConfig:
    """The `trainer`/`optimizer`/`scheduler` sections with a stage's overrides (null: global) applied.

    With `check` (once, when the stage is built), the overridden sections are checked again.

    Raises:
        ConfigError: prefixed with `where.` when an override is invalid.
    """
    given = {section: {key: value for key, value in (overrides.get(section) or {}).items() if value is not None} for section in TRAINING_SECTIONS}
    base = OmegaConf.masked_copy(typed, list(TRAINING_SECTIONS))
    if not any(given.values()):
        return base
    try:
        merged = OmegaConf.merge(base, {section: values for section, values in given.items() if values})
    except OmegaConfBaseException as error:
        raise ConfigError(describe_omegaconf_error(error, prefix=f"{where}.")) from None
    if not check:
        return merged
    try:
        _check_rules(merged, tuple(section for section, values in given.items() if values))
        if given["optimizer"] or given["scheduler"]:
            for section in ("optimizer", "scheduler"):
                check_call(merged[section], section)
    except ConfigError as error:
        raise ConfigError(f"{where}.{error}") from None
    return merged


def stage_training_block() -> dict[str, dict[str, None]]:
    """The `stage/_training` config every training stage includes: each overridable key, null.

    Generated from `TrainerConfig`, so a new trainer key is overridable per stage at once.
    """
    return {
        "trainer": {item.name: None for item in fields(TrainerConfig) if item.name not in RUN_TRAINER_KEYS},
        "optimizer": {key: None for key in STAGE_OPTIMIZER_KEYS},
        "scheduler": {key: None for key in STAGE_SCHEDULER_KEYS},
    }


def check_call(node: Any, where: str) -> None:
    """Check that a `_target_` config's arguments fit the target's signature, without calling it.

    Raises:
        ConfigError: the target cannot be imported, or an argument it does not take.
    """
    from effitrain.config import locate

    target = node.get("_target_")
    try:
        function = locate(target)
    except ImportError:
        raise ConfigError(f"{where}._target_ = {target!r}: cannot import it") from None
    arguments = {key: value for key, value in OmegaConf.to_container(node, resolve=True).items() if not key.startswith("_")}
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return
    try:
        (signature.bind_partial if node.get("_partial_") else signature.bind)(**arguments)
    except TypeError as error:
        accepted = [name for name in signature.parameters if name not in ("self", "args", "kwargs")]
        raise ConfigError(f"{where}: {error} (allowed keys: {', '.join(accepted)})") from None
