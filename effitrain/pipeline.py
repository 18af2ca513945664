"""One run: build device, precision, data and model, walk the model through the recipe's stages,
measure it after each, and keep the ledger (summary.json) and checkpoints in the run folder."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from effitrain.config.schema import validate
from effitrain.errors import ConfigError, EffitrainError
from effitrain.measure import measure
from effitrain.predictions import write_predictions
from effitrain.precision import PrecisionPolicy, build_precision, resolve_device
from effitrain.report import Ledger, ledger_table, render_text
from effitrain.runlog import RunLogger
from effitrain.stages.base import Context, Stage, build_model, build_stage

log = logging.getLogger("effitrain")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_stages(cfg: DictConfig) -> dict[str, Stage]:
    """Validate the whole config and build every stage, before any work starts.

    Raises:
        ConfigError: the first problem found, as one line.
    """
    validate(cfg)
    stages = {}
    for name, stage_cfg in cfg.stage.items():
        stage = build_stage(str(name), stage_cfg)
        stage.check(cfg, str(name))
        stages[str(name)] = stage
    return stages


def precision_from_config(cfg: DictConfig) -> PrecisionPolicy:
    """Resolve `cfg.device` and build the `cfg.precision` policy on it (ConfigError if impossible)."""
    settings = cfg.precision
    return build_precision(
        settings.policy, resolve_device(cfg.device), settings.init_scale, settings.growth_interval, settings.max_skipped_steps
    )


def model_file(run_dir: Path, index: int, name: str, stage: Stage) -> Path:
    """Where stage number `index` (named `name`) of a run saves its resulting model."""
    return run_dir / "checkpoints" / f"{index:02d}_{name}{stage.model_suffix}"


def check(cfg: DictConfig) -> None:
    """Everything that can be checked before a run folder exists: config, stages, device,
    precision and the model (built once on the CPU and dropped). Data is checked when loaded.

    Raises:
        ConfigError: the first problem found, as one line.
    """
    build_stages(cfg)
    precision_from_config(cfg)
    build_model(cfg.model)


def build_data(cfg: DictConfig) -> Any:
    """Instantiate the `data` config into a DataBundle, with one-line errors."""
    try:
        return instantiate(cfg.data, _convert_="all")
    except EffitrainError:
        raise
    except Exception as error:  # instantiate wraps what the builder raises
        cause = error.__cause__ or error
        if isinstance(cause, EffitrainError):
            raise cause from None
        raise ConfigError(f"data: cannot build {cfg.data.get('_target_')!r} ({str(cause).splitlines()[0]})") from None


def run(cfg: DictConfig, run_dir: Path, recipe: str) -> float:
    """Run the recipe's stages in order inside `run_dir`.

    Args:
        cfg: the composed config.
        run_dir: the run folder (Hydra's output dir).
        recipe: the recipe's name, for the ledger.

    Returns:
        The last stage's test accuracy (the objective for sweepers).

    Raises:
        EffitrainError: a problem the user can act on; the ledger is marked failed first.
    """
    stages = build_stages(cfg)
    seed_everything(cfg.seed)
    precision = precision_from_config(cfg)
    device = precision.device
    log.info("effitrain: recipe %s on %s, precision %s (%s)", recipe, device, precision.used, precision.why)
    header = {"recipe": recipe, "device": str(device), "precision": precision.as_dict(), "seed": cfg.seed}
    ledger = Ledger.resume(run_dir / "summary.json", header) if cfg.resume else Ledger(run_dir / "summary.json", header)
    ledger.write()
    logger = RunLogger(run_dir)
    try:
        data = build_data(cfg)
        ctx = Context(cfg=cfg, precision=precision, data=data, run_dir=run_dir, logger=logger, resume=bool(cfg.resume))
        model = build_model(cfg.model).to(device)
        example = data.example_batch(cfg.measure.batch_size)
        for index, (name, stage) in enumerate(stages.items()):
            saved = model_file(run_dir, index, name, stage)
            ctx.stage_name = name
            model = stage.prepare(model, ctx)
            if name in ledger.completed:
                model = stage.load_model(model, saved)
                log.info("[%s] already completed; loaded %s", name, saved.name)
            else:
                ctx.extra = {}
                started = time.perf_counter()
                model = stage.run(name, model, ctx)
                seconds = time.perf_counter() - started
                stage.save_model(model, saved)
                metrics = measure(
                    model, data.test, example, precision, saved,
                    warmup=cfg.measure.warmup, repeats=cfg.measure.repeats, threads=cfg.measure.threads,
                )
                write_predictions(run_dir / "predictions" / f"{name}.json", metrics.pop("labels"), metrics.pop("predictions"))
                ledger.add(name, stage.kind, {**metrics, "seconds": seconds, **ctx.extra})
                log.info("[%s] test accuracy %.4f, %d params, %.3f ms/batch", name, metrics["accuracy"], metrics["params"], metrics["latency_ms"])
            ctx.models[name] = model
    except EffitrainError as error:
        ledger.finish("failed", str(error))
        raise
    except BaseException as error:
        ledger.finish("failed", f"{type(error).__name__}: {error}")
        raise
    finally:
        logger.close()
    ledger.finish("completed")
    log.info("\n%s", render_text(ledger_table(ledger.data)).rstrip())
    return float(ledger.data["stages"][-1]["metrics"]["accuracy"])


def load_run_model(run_dir: Path, stage: str | None = None) -> tuple[Any, Any]:
    """Rebuild the model a completed stage of a run saved, in any process (e.g. a fresh one).

    The run's stages are replayed the way a resumed run replays completed ones: each builds
    its model's structure (`prepare`: students, pruned shapes, quantized layers) and loads its
    saved file. Nothing in the run folder is written.

    Args:
        run_dir: an effitrain run folder.
        stage: the stage whose model to return (default: the last completed one).

    Returns:
        (model in eval mode, the run's DataBundle).

    Raises:
        ConfigError: not a run folder, or no such completed stage.
    """
    import json
    import tempfile

    from omegaconf import OmegaConf

    from effitrain.config.compose import register_resolvers

    summary_path, config_path = run_dir / "summary.json", run_dir / ".hydra" / "config.yaml"
    if not summary_path.is_file() or not config_path.is_file():
        raise ConfigError(f"{run_dir}: not an effitrain run folder (no summary.json or .hydra/config.yaml)")
    completed = [row["name"] for row in json.loads(summary_path.read_text())["stages"]]
    stage = stage if stage is not None else (completed[-1] if completed else None)
    if stage not in completed:
        raise ConfigError(f"{run_dir}: no completed stage {stage!r} (allowed: {', '.join(completed) or 'none'})")
    register_resolvers()
    cfg = OmegaConf.load(config_path)
    stages = build_stages(cfg)
    seed_everything(cfg.seed)
    precision = precision_from_config(cfg)
    data = build_data(cfg)
    with tempfile.TemporaryDirectory() as scratch:
        logger = RunLogger(Path(scratch), tensorboard=False)
        ctx = Context(cfg=cfg, precision=precision, data=data, run_dir=run_dir, logger=logger, resume=True)
        model = build_model(cfg.model).to(precision.device)
        for index, (name, step) in enumerate(stages.items()):
            ctx.stage_name = name
            model = step.load_model(step.prepare(model, ctx), model_file(run_dir, index, name, step))
            ctx.models[name] = model
            if name == stage:
                break
        logger.close()
    return model.eval(), data
