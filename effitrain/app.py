"""The Hydra task function: `effitrain run` forwards its arguments here untouched, so every
Hydra feature (overrides, -m sweeps, --cfg, hydra.run.dir, sweeper/launcher plugins) works."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from effitrain.config import CONF_DIR, register_recipes
from effitrain.config.compose import register_resolvers
from effitrain.errors import EffitrainError

log = logging.getLogger("effitrain")

register_recipes()
register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    """Run one job; returns the configured objective(s), from validation or measured cost, for
    sweepers (e.g. Optuna): one value, or a tuple for multi-objective search."""
    from effitrain import pipeline

    runtime = HydraConfig.get().runtime
    try:
        return pipeline.run(cfg, Path(runtime.output_dir), recipe=runtime.choices.get("recipe") or "none")
    except EffitrainError as error:
        report_error(str(error))
        sys.exit(2)


def report_error(message: str) -> None:
    """Print `error: message` as one line on stderr and append it to run.log."""
    print(f"error: {message}", file=sys.stderr)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
