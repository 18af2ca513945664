"""Compose configs outside a run (for `show` and the pre-run check) and turn Hydra's
multi-line errors into one line a user can act on."""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from effitrain.config import CONF_DIR, register_recipes
from effitrain.errors import ConfigError

_RESOLVED: dict[str, str] = {}


def unique_dir(path: str) -> str:
    """Resolver `effitrain_unique`: `path`, or `path_2`, `path_3` ... whichever does not exist yet.

    The folder is created here (mkdir fails if another process took it first), so two runs
    started in the same second never share a folder. Memoised: Hydra resolves the run dir
    several times per process.
    """
    if path not in _RESOLVED:
        base = Path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        for attempt in itertools.count(1):
            candidate = base if attempt == 1 else base.with_name(f"{base.name}_{attempt}")
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            _RESOLVED[path] = str(candidate)
            break
    return _RESOLVED[path]


def objective_directions(objectives: list) -> str | list[str]:
    """Resolver `effitrain_directions`: the sweeper's direction(s) from `objective` (one, or a list)."""
    directions = [str(item["direction"]) for item in objectives]
    return directions[0] if len(directions) == 1 else directions


def register_resolvers() -> None:
    """Register effitrain's OmegaConf resolvers (idempotent)."""
    if not OmegaConf.has_resolver("effitrain_unique"):
        # use_cache: the resolved folder is kept in the config itself, which Hydra copies into every
        # sweep job's config (copy_cache) and launchers pickle into their worker processes, so a
        # joblib/submitit job resolves the sweep folder its launcher made instead of a new _2
        OmegaConf.register_new_resolver("effitrain_unique", unique_dir, use_cache=True)
    if not OmegaConf.has_resolver("effitrain_directions"):
        OmegaConf.register_new_resolver("effitrain_directions", objective_directions)


def compose(overrides: list[str]) -> DictConfig:
    """Compose the root config with `overrides` through Hydra's compose API (no run folder).

    Raises:
        ConfigError: composition failed (unknown option, key or bad override), as one line.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_recipes()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except Exception as error:  # Hydra raises several exception types; all become one line
        raise ConfigError(explain(error, overrides)) from None
    finally:
        GlobalHydra.instance().clear()


def explain(error: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra/OmegaConf composition error: what is wrong, where, what is allowed."""
    from hydra.errors import MissingConfigException

    if isinstance(error, MissingConfigException) and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        options = ", ".join(error.options or []) or "none"
        if group:
            return f"{group}={option}: no such option in group '{group}' (allowed: {options})"
        return f"{option}: no such config (allowed: {options})"
    if isinstance(error, OmegaConfBaseException) and error.full_key:
        return f"{error.full_key}: {(error.msg or str(error)).splitlines()[0]}"
    text = f"{error}\n{error.__cause__ or ''}"
    unknown = re.search(r"Could not override '([^']+)'.*?To append to your config use (\+\S+)", text, re.S)
    if unknown and "not in struct" in text:
        return f"{unknown.group(1)}: no such key here (to add a new key on purpose: {unknown.group(2)})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("full_key:", "object_type", "reference_type", "Set the environment"))]
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        first_cause = str(cause).strip().splitlines()[0]
        if first_cause not in lines:
            lines.append(first_cause)
    return "; ".join(lines[:3]) or type(error).__name__


def expand_sweeps(overrides: list[str]) -> Iterator[list[str]]:
    """Yield override lists to check before a multirun starts.

    When every sweep is a list or range (what Hydra's basic sweeper runs), that is every
    combination (`a=1,2 b=x,y` -> 4 lists). When a sweep is one only a sweeper plugin samples
    (Optuna's `interval(...)`), the jobs are not known in advance: each concrete value the
    command names is checked once (list values, range values, an interval's two ends), the
    others held at their first value; each job checks its own config again when it starts.

    Raises:
        ConfigError: an override does not parse.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as error:
        raise ConfigError(explain(error, overrides)) from None
    choices: list[list[str]] = []
    enumerable = True
    for override in parsed:
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        key = override.get_key_element()
        value = override.value()
        if isinstance(value, IntervalSweep):
            enumerable = False
            choices.append([f"{key}={value.start}", f"{key}={value.end}"])
            continue
        try:
            choices.append([f"{key}={item}" for item in override.sweep_string_iterator()])
        except Exception:  # a sweep only its sweeper can sample (e.g. tagged): its job checks it
            enumerable = False
    if enumerable:
        for combination in itertools.product(*choices):
            yield list(combination)
        return
    firsts = [values[0] for values in choices]
    yield firsts
    for index, values in enumerate(choices):
        for value in values[1:]:
            yield [*firsts[:index], value, *firsts[index + 1:]]
