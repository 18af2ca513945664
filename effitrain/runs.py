"""Run folders: where a stage's model is saved, reading and checking a folder before anything
uses it, and the one replay of a recipe's stages that both a run and `load_run_model` walk.

`replay` prepares each stage in order and either loads what a completed stage saved or hands
the stage to `execute` (the pipeline's: run, save, measure, ledger). A resumed run and a model
rebuilt in a fresh process therefore rebuild structures (students, pruned shapes, quantized
layers) by the same code.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from effitrain.errors import ConfigError
from effitrain.runfiles import read_summary
from effitrain.stages.base import Context, Prepared, Stage

log = logging.getLogger("effitrain")

Execute = Callable[[int, str, Stage, Prepared, Path], nn.Module]


def model_file(run_dir: Path, index: int, name: str, stage: Stage) -> Path:
    """Where stage number `index` (named `name`) of a run saves its resulting model."""
    return run_dir / "checkpoints" / f"{index:02d}_{name}{stage.model_suffix}"


def completed_stage(run_dir: Path, stage: Optional[str]) -> str:
    """The name of `stage` (default: the last completed one) after checking the run completed it.

    Raises:
        ConfigError: not a run folder, or no such completed stage (listing the completed ones).
    """
    completed = [row["name"] for row in read_summary(run_dir)["stages"]]
    name = stage if stage is not None else (completed[-1] if completed else None)
    if name not in completed:
        raise ConfigError(f"{run_dir}: no completed stage {name!r} (allowed: {', '.join(completed) or 'none'})")
    return name  # type: ignore[return-value]


def _check_file(path: Path) -> None:
    from effitrain.checkpoint import unreadable

    reason = unreadable(path)
    if reason is not None:
        raise ConfigError(f"{path}: damaged or truncated ({reason}); the run folder is left as it is")


def check_resumable(run_dir: Path) -> None:
    """Everything a resume will read: the ledger, every completed stage's model file, and the
    interrupted stage's epoch checkpoints. Nothing is written.

    Raises:
        ConfigError: one line naming the first file that cannot be read.
    """
    if not (run_dir / ".hydra" / "overrides.yaml").is_file():
        raise ConfigError(f"{run_dir}: not an effitrain run folder (no .hydra/overrides.yaml)")
    summary = read_summary(run_dir)
    if summary.get("status") == "completed":
        raise ConfigError(f"{run_dir}: the run already completed; nothing to resume")
    checkpoints = run_dir / "checkpoints"
    for index, row in enumerate(summary["stages"]):
        saved = sorted(checkpoints.glob(f"{index:02d}_{row['name']}.*"))
        if not saved:
            raise ConfigError(f"{checkpoints}: no saved model of completed stage {row['name']!r}; the run folder is left as it is")
        _check_file(saved[0])
    for path in sorted(checkpoints.glob("*/*")) if checkpoints.is_dir() else []:
        if path.suffix in (".safetensors", ".pt") and not path.name.startswith("."):
            _check_file(path)


def replay(stages: dict[str, Stage], model: nn.Module, ctx: Context, run_dir: Path, completed: set[str],
           execute: Execute | None, upto: Optional[str] = None, keep: Callable[[str, nn.Module], None] | None = None,
           wait: Callable[[str], None] | None = None) -> nn.Module:
    """Walk the stages in order: load the completed ones, `execute` the others; stop after `upto`.

    Args:
        keep: called with each stage's name and model as soon as it is there (later stages may
            change that model in place: copy what must stay as it is).
        wait: for the processes of a multi-process run other than rank 0: called before a stage
            that runs on rank 0 alone (`Stage.on_every_rank` false) until rank 0 completed it;
            then its saved model is loaded here like a completed stage's.

    Returns:
        The last stage's model.
    """
    completed = set(completed)
    sources = {stage.source for stage in stages.values() if getattr(stage, "source", None)}  # `source:` names an earlier stage
    sources |= {str(teacher) for stage in stages.values() for teacher in getattr(stage, "teachers", None) or [] if str(teacher) in stages}
    for index, (name, stage) in enumerate(stages.items()):
        if wait is not None and name not in completed and not stage.on_every_rank:
            wait(name)
            completed.add(name)
        saved = model_file(run_dir, index, name, stage)
        if name in completed and not saved.exists():  # saved under the suffix its model needed (e.g. auto chose x86_static)
            saved = next(iter(sorted(path for path in saved.parent.glob(f"{index:02d}_{name}.*") if path.is_file())), saved)
        ctx.stage_name, ctx.stage_position = name, f"{index + 1}/{len(stages)}"
        prepared = stage.prepare(model, ctx)
        if name in completed:
            model = stage.load_model(prepared, saved)
            if execute is not None and wait is None:
                log.info("[%s] already completed; loaded %s", name, saved.name)
        else:
            assert execute is not None, f"stage {name} has not completed"
            model = execute(index, name, stage, prepared, saved)
        # a stage a later one starts from is kept as it is now: the stages in between may change the model in place
        ctx.models[name] = copy.deepcopy(model) if name in sources else model
        if keep is not None:
            keep(name, model)
        if name == upto:
            break
    return model


def rebuild_models(plan: Any, data: Any, run_dir: Path, names: list[str]) -> dict[str, nn.Module]:
    """The models the named completed stages saved, rebuilt in one replay of the plan's stages
    (the way a resumed run replays completed ones); nothing in the run folder is written.

    Args:
        plan: the run's RunPlan (config, task, stages, precision).
        data: the run's DataBundle.
        names: completed stages, any order.
    """
    from effitrain.pipeline import seed_everything
    from effitrain.runlog import RunLogger
    from effitrain.stages.base import build_model

    seed_everything(plan.cfg.seed)
    order = list(plan.stages)
    last = max(names, key=order.index)
    models: dict[str, nn.Module] = {}

    def keep(name: str, model: nn.Module) -> None:  # later stages may change a model in place: copy all but the last
        if name in names:
            models[name] = model if name == last else copy.deepcopy(model)

    with tempfile.TemporaryDirectory() as scratch:
        logger = RunLogger(Path(scratch), tensorboard=False)
        ctx = Context(cfg=plan.cfg, precision=plan.precision, data=data, task=plan.task, run_dir=run_dir, logger=logger,
                      resume=True, load_run=lambda path, which: load_run_model(path, which)[0])
        model = build_model(plan.cfg.model).to(plan.precision.device)
        try:
            replay(plan.stages, model, ctx, run_dir, set(plan.stages), None, upto=last, keep=keep)
        finally:
            logger.close()
    return {name: models[name].eval() for name in names}


def load_run_models(run_dir: Path, stages: Optional[list[str]] = None) -> tuple[dict[str, nn.Module], Any, Any]:
    """Rebuild the models completed stages of a run saved, in any process (e.g. a fresh one),
    from the run folder alone (see `rebuild_models`).

    Args:
        run_dir: an effitrain run folder.
        stages: the stages whose models to return (default: the last completed one).

    Returns:
        ({stage: model in eval mode}, the run's DataBundle, the run's RunPlan).

    Raises:
        ConfigError: not a run folder, or no such completed stage.
    """
    from omegaconf import OmegaConf

    from effitrain.config.compose import register_resolvers
    from effitrain.pipeline import build_data, make_plan, seed_everything

    names = [completed_stage(run_dir, stage) for stage in (stages or [None])]  # type: ignore[list-item]
    register_resolvers()
    plan = make_plan(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))
    seed_everything(plan.cfg.seed)
    data = build_data(plan.cfg)
    return rebuild_models(plan, data, run_dir, names), data, plan


def load_run_model(run_dir: Path, stage: Optional[str] = None) -> tuple[nn.Module, Any]:
    """Rebuild the model a completed stage of a run saved (see `load_run_models`).

    Returns:
        (model in eval mode, the run's DataBundle).
    """
    models, data, _ = load_run_models(run_dir, [stage] if stage is not None else None)
    return next(iter(models.values())), data
