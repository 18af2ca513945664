"""One run: check everything once (the plan), build device, precision, data and model, walk the
model through the recipe's stages, measure it after each, and keep the ledger (summary.json),
predictions and checkpoints in the run folder. Returns the sweep objective(s)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from effitrain.config.schema import validate
from effitrain.data.build import build_data, check_data_options
from effitrain.errors import ConfigError, EffitrainError, TrainingError, instantiate_or_explain, require
from effitrain.measure import measure
from effitrain.precision import PrecisionPolicy, build_precision, resolve_device
from effitrain.predictions import write_predictions
from effitrain.ledger import Ledger, ledger_table, render_text
from effitrain.runlog import RunLogger
from effitrain.parallel import world as parallel
from effitrain.parallel.checks import check_processes
from effitrain.runfiles import read_summary, write_json
from effitrain.runs import load_run_model, replay
from effitrain.stages.base import Context, Prepared, Stage, StageResult, build_model, build_stage
from effitrain.tasks import Task
from effitrain.trainer.compile import check_compiler

log = logging.getLogger("effitrain")

COST_METRICS = ("latency_ms", "size_bytes", "params", "nonzero_params", "sparsity")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunPlan:
    """Everything checked before a run folder exists, built once.

    Attributes:
        cfg: the validated, resolved config.
        task: the task (batches, loss, metrics).
        stages: the built stages, in order.
        precision: the precision policy on the run device.
    """

    cfg: DictConfig
    task: Task
    stages: dict[str, Stage]
    precision: PrecisionPolicy


def precision_from_config(cfg: DictConfig) -> PrecisionPolicy:
    """Resolve `cfg.device` (in a multi-process CUDA run: this process's GPU) and build the
    `cfg.precision` policy on it (ConfigError if impossible)."""
    settings = cfg.precision
    device = resolve_device(cfg.device)
    world = parallel.current()
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    return build_precision(settings.policy, device, settings.init_scale, settings.growth_interval, settings.max_skipped_steps)


def build_task(node: DictConfig) -> Task:
    task = instantiate_or_explain(node, "task")
    if not isinstance(task, Task):
        raise ConfigError(f"task._target_ = {node.get('_target_')!r} is not an effitrain Task (subclass effitrain.tasks.Task)")
    return task


def _check_metrics(cfg: DictConfig, task: Task) -> None:
    """Monitors and objectives name metrics the task reports (objectives: validation or cost only)."""
    monitors = [f"val_{metric}" for metric in task.metrics]
    require(cfg.trainer.monitor in monitors, "trainer.monitor", cfg.trainer.monitor, ", ".join(monitors))
    for name, stage in cfg.stage.items():
        monitor = (stage.get("trainer") or {}).get("monitor")
        if monitor is not None:
            require(monitor in monitors, f"stage.{name}.trainer.monitor", monitor, ", ".join(monitors))
    allowed = [*monitors, *COST_METRICS]
    for index, objective in enumerate(cfg.objective):
        if objective.metric in task.metrics:
            raise ConfigError(f"objective[{index}].metric = {objective.metric!r} is a test-split figure, for reporting only; "
                              f"sweeps tune on validation (allowed: {', '.join(allowed)})")
        require(objective.metric in allowed, f"objective[{index}].metric", objective.metric, ", ".join(allowed))


def _check_objective_stages(cfg: DictConfig, stages: dict[str, Stage]) -> None:
    """An objective on a task metric must name a stage whose row has one."""
    for index, objective in enumerate(cfg.objective):
        name = objective.stage if objective.stage is not None else list(stages)[-1]
        if objective.metric not in COST_METRICS and not stages[name].reports_task_metrics:
            raise ConfigError(f"objective[{index}].metric = {objective.metric!r}: stage {name!r} ({stages[name].kind}) has no task "
                              "metrics in its row (allowed: a later stage, e.g. objective.0.stage=NAME, or a cost metric)")


def _check_runtime(cfg: DictConfig) -> None:
    """`measure.runtime: onnxruntime` needs the deploy extra."""
    if cfg.measure.runtime != "onnxruntime":
        return
    from effitrain.export import check_runtime

    try:
        check_runtime("onnx")
    except ConfigError:
        raise ConfigError("measure.runtime = 'onnxruntime' needs onnxruntime, onnx and onnxscript, which are not installed "
                          "(pip install -e \".[deploy]\"; allowed without them: measure.runtime=torch)") from None


def make_plan(cfg: DictConfig) -> RunPlan:
    """Validate the whole config once and build the task, every stage and the precision policy.

    Raises:
        ConfigError: the first problem found, as one line.
    """
    typed = validate(cfg)
    task = build_task(typed.task)
    _check_metrics(typed, task)
    check_data_options(typed, task)
    _check_runtime(typed)
    stages = {}
    for name, stage_cfg in typed.stage.items():
        stage = build_stage(str(name), stage_cfg)
        stage.check(typed, str(name))
        stages[str(name)] = stage
    _check_objective_stages(typed, stages)
    precision = precision_from_config(typed)
    check_processes(typed, precision.device)
    check_compiler(typed.trainer.compile, precision.device)
    for name, stage in stages.items():
        override = (getattr(stage, "trainer", None) or {}).get("compile")
        check_compiler(override, precision.device, f"stage.{name}.trainer.compile")
    return RunPlan(typed, task, stages, precision)


# The CLI checks every job before Hydra makes a folder; a job run in the same process (a single
# run, or the basic sweep launcher) reuses that plan and model instead of checking and building
# again. Jobs of other launchers (joblib, submitit) run elsewhere and plan for themselves.
_PLANS: dict[str, RunPlan] = {}
_MODELS: dict[str, tuple[nn.Module, torch.Tensor]] = {}  # key -> (model, torch RNG state right after building it)
_DATA: dict[str, Any] = {}  # key -> the DataBundle a check had to build


def _key(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def _model_key(plan: RunPlan) -> str:
    return f"{plan.cfg.seed}\n{OmegaConf.to_yaml(plan.cfg.model)}"


def check(cfg: DictConfig, keep_model: bool = False) -> RunPlan:
    """Everything that can be checked before a run folder exists: config, task, stages, the
    files stages read, device, precision, the model (built once) and the module names stages
    look for in it, and with `data.label_fraction` the training labels (the data built once).

    Args:
        keep_model: keep the built model for the run about to start in this process (a single
            run; a sweep's jobs build their own rather than hold one model per job in memory).

    Raises:
        ConfigError: the first problem found, as one line.
    """
    plan = make_plan(cfg)
    seed_everything(plan.cfg.seed)
    model = build_model(plan.cfg.model)
    for name, stage in plan.stages.items():  # layer names and heads, on the model each stage will be handed
        stage.check_model(model, plan.cfg, name)
        if not stage.keeps_architecture():
            break
    if keep_model:
        _MODELS[_model_key(plan)] = (model, torch.get_rng_state())
    if plan.cfg.data.get("label_fraction") not in (None, 1):  # whether every class keeps a label: the training labels say
        data = build_data(plan.cfg)
        if keep_model:
            _DATA[_data_key(plan)] = data
    _PLANS[_key(cfg)] = plan
    return plan


def _data_key(plan: RunPlan) -> str:
    return f"{plan.cfg.seed}\n{OmegaConf.to_yaml(plan.cfg.data)}"


def _initial_model(plan: RunPlan) -> nn.Module:
    """The recipe's model as a fresh build right after `seed_everything` gives it (the RNG too)."""
    kept = _MODELS.pop(_model_key(plan), None)
    if kept is None:
        return build_model(plan.cfg.model)
    model, rng = kept
    torch.set_rng_state(rng)  # as if built just now
    return model


def planned_schedule(cfg: DictConfig) -> list[tuple[str, str, Any]]:
    """(stage, kind, PlannedFit) of every trainer call the recipe will make, without training:
    the config is checked as for a run and the data built for its batches per epoch.

    Raises:
        ConfigError: the first problem found, as one line.
    """
    plan = make_plan(cfg)
    seed_everything(plan.cfg.seed)
    data = build_data(plan.cfg)
    return [(name, stage.kind, fit) for name, stage in plan.stages.items() for fit in stage.planned(name, plan.cfg, stage.batches_per_epoch(data))]


def objectives(plan: RunPlan, rows: list[dict[str, Any]]) -> dict[str, float]:
    """The configured objective values, read from the ledger rows (validation or cost)."""
    by_name = {row["name"]: row["metrics"] for row in rows}
    values = {}
    for objective in plan.cfg.objective:
        stage = objective.stage if objective.stage is not None else rows[-1]["name"]
        values[objective.metric if objective.stage is None else f"{stage}.{objective.metric}"] = float(by_name[stage][objective.metric])
    return values


def _write_report(run_dir: Path) -> None:
    """report.html in the run folder; a plotting failure is logged and never fails a finished run."""
    from effitrain.report import write_run_report

    try:
        log.info("report: %s", write_run_report(run_dir))
    except Exception as error:  # the ledger is complete; the page is a view of it
        log.warning("report.html not written (%s: %s); `effitrain report %s` retries", type(error).__name__, error, run_dir)


def final_retime(plan: RunPlan, data: Any, run_dir: Path, ledger: Ledger, example: Any) -> None:
    """Re-time every completed stage's saved model side by side, rebuilt from its saved file as a
    fresh process would (see effitrain.retime), and put the figures in the ledger; each stage's
    own timing stays as latency_ms_during_run."""
    from effitrain import retime
    from effitrain.runs import rebuild_models

    models = rebuild_models(plan, data, run_dir, [row["name"] for row in ledger.data["stages"]])
    latencies = retime.retime(models, example, plan.precision, plan.cfg.measure)
    retime.apply(ledger.data["stages"], latencies)
    ledger.write()
    log.info("final re-time, %d stages side by side (%d rounds): %s", len(latencies), plan.cfg.measure.rounds,
             ", ".join(f"{name} {value:.3f} ms" for name, value in latencies.items()))


def run(cfg: DictConfig, run_dir: Path, recipe: str) -> float | tuple[float, ...] | None:
    """Run the recipe's stages in order inside `run_dir` (the Hydra job's entry).

    With `trainer.devices` > 1 this process starts that many workers and waits for them; inside a
    SLURM/submitit job of several tasks every task joins the run as one process; under torchrun,
    rank 0 hands the config and folder to the other ranks first.

    Args:
        cfg: the composed config.
        run_dir: the run folder (Hydra's output dir).
        recipe: the recipe's name, for the ledger.

    Returns:
        The objective for sweepers: one value, or a tuple when `objective` lists several (None
        on processes other than rank 0).

    Raises:
        EffitrainError: a problem the user can act on; the ledger is marked failed first.
    """
    from effitrain.parallel import launch

    plan = _PLANS.pop(_key(cfg), None) or make_plan(cfg)
    world = parallel.current()
    if not world.distributed and launch.join_submitit(plan.cfg.trainer, plan.precision.device):
        plan = make_plan(plan.cfg)  # again, on this task's device
        world = parallel.current()
    if world.launcher == "torchrun" and world.main:
        launch.hand_out(OmegaConf.to_yaml(plan.cfg), str(run_dir), recipe)
    if world.distributed or plan.cfg.trainer.devices == 1:
        return run_stages(plan, run_dir, recipe)
    return run_workers(plan, run_dir, recipe)


def run_workers(plan: RunPlan, run_dir: Path, recipe: str) -> float | tuple[float, ...]:
    """`trainer.devices` processes on this machine (torch's elastic agent), each running the
    stages as one rank; returns the objective rank 0 wrote into the ledger."""
    from hydra.core.hydra_config import HydraConfig

    from effitrain.parallel import launch

    settings = plan.cfg.trainer
    backend = parallel.choose_backend(settings.dist_backend, plan.precision.device)
    log.info("effitrain: recipe %s on %d processes (%s)", recipe, settings.devices, backend)
    logging_config = OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True) if HydraConfig.initialized() else None
    job = launch.Job(OmegaConf.to_yaml(plan.cfg), str(run_dir), recipe, logging_config, parallel.current().threads_alone)  # type: ignore[arg-type]
    try:
        launch.launch_workers(job, int(settings.devices), settings.dist_port, backend, float(settings.dist_timeout_s))
    except EffitrainError as error:
        mark_failed(run_dir, str(error))
        raise
    summary = read_summary(run_dir)
    values = tuple(summary.get("objective", {}).values())
    return values[0] if len(values) == 1 else values


def mark_failed(run_dir: Path, message: str) -> None:
    """Mark a run's ledger failed after its processes ended (rank 0 may have been stopped
    before it could); a completed or already failed ledger keeps its own status."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return
    summary = read_summary(run_dir)
    if summary.get("status") == "running" or summary.get("error", "").startswith("stopped by signal"):
        write_json(path, {**summary, "status": "failed", "error": message})


def _timed_out(error: BaseException, cfg: DictConfig) -> str | None:
    """The one line for a collective that gave up waiting (gloo and NCCL word it differently)."""
    text = str(error)
    if not isinstance(error, RuntimeError) or "timed out" not in text.lower():
        return None
    detail = next((line.strip() for line in text.splitlines() if "timed out" in line.lower()), text)
    return (f"waited trainer.dist_timeout_s = {cfg.trainer.dist_timeout_s:g} s for the other processes of the run, which stopped "
            f"answering (a process hung or was stopped; {detail.split('] ')[-1][:160]})")


class NullLogger:
    """The metrics sink of processes other than rank 0: rank 0 alone writes metrics.jsonl and tb/."""

    def log(self, stage: str, step: int, metrics: dict[str, Any], **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


def run_stages(plan: RunPlan, run_dir: Path, recipe: str) -> float | tuple[float, ...] | None:
    """Run the plan's stages as this process: the whole run on one process, or one rank of many.

    Rank 0 keeps the ledger, the logs, the checkpoints and the measurements. Stages that train
    run on every rank (DDP inside the trainer); a stage that only measures or converts
    (`Stage.on_every_rank` false: evaluate, quantize, sparsify) runs on rank 0 while the others
    wait, then they load what it saved, as a resumed run loads a completed stage.
    """
    cfg, task, precision = plan.cfg, plan.task, plan.precision
    world = parallel.current()
    seed_everything(cfg.seed)
    device = precision.device
    if world.main:
        log.info("effitrain: recipe %s on %s, precision %s (%s)%s", recipe, device, precision.used, precision.why,
                 f"; {world.describe()}" if world.distributed else "")
    header = {"recipe": recipe, "device": str(device), "precision": precision.as_dict(), "seed": cfg.seed,
              "task": task.name, "headline": task.headline, "directions": dict(task.metrics),
              **({"processes": world.size, "dist_backend": world.backend, "launcher": world.launcher} if world.distributed else {})}
    ledger = None
    if world.main:
        ledger = Ledger.resume(run_dir / "summary.json", header) if cfg.resume else Ledger(run_dir / "summary.json", header)
        ledger.write()
    parallel.barrier()  # the others read which stages a resumed run completed
    completed = ledger.completed if ledger is not None else ({row["name"] for row in read_summary(run_dir)["stages"]} if cfg.resume else set())
    logger: Any = RunLogger(run_dir) if world.main else NullLogger()
    try:
        data = _DATA.pop(_data_key(plan), None)
        data = build_data(cfg) if data is None else data
        ctx = Context(cfg=cfg, precision=precision, data=data, task=task, run_dir=run_dir, logger=logger, resume=bool(cfg.resume),
                      load_run=lambda path, stage: load_run_model(path, stage)[0])
        model = _initial_model(plan).to(device)
        example = ctx.example_batch(cfg.measure.batch_size)

        def execute(index: int, name: str, stage: Stage, prepared: Prepared, saved: Path) -> nn.Module:
            started = time.perf_counter()
            result = stage.run(name, prepared, ctx)
            if not isinstance(result, StageResult):
                raise ConfigError(f"stage.{name}: {type(stage).__name__}.run returned {type(result).__name__} "
                                  "(allowed: effitrain.stages.StageResult(model, metrics))")
            if world.main:
                record(name, stage, result, time.perf_counter() - started, saved)
            parallel.barrier()  # rank 0 saved and measured; processes that did not run the stage load its file
            return result.model

        def record(name: str, stage: Stage, result: StageResult, seconds: float, saved: Path) -> None:
            """Rank 0: save the stage's model, measure it, add its ledger row."""
            assert ledger is not None
            saved = stage.save_model(result.model, saved) or saved  # a stage may pick the suffix its model needs
            metrics = measure(result.model, task, data.test, data.val, example, precision, saved, warmup=cfg.measure.warmup,
                              repeats=cfg.measure.repeats, threads=cfg.measure.threads, task_metrics=stage.reports_task_metrics)
            if cfg.measure.runtime == "onnxruntime":  # the latency a deployment in ONNX Runtime gets; torch's kept beside it
                from effitrain.export.ort import onnxruntime_latency

                metrics["latency_ms_torch"] = metrics["latency_ms"]
                metrics["latency_ms"], metrics["latency_runtime"] = onnxruntime_latency(
                    result.model, example, cfg.measure.warmup, cfg.measure.repeats, cfg.measure.threads, device.type == "cuda", f"stage.{name}")
            labels, predictions = metrics.pop("labels", None), metrics.pop("predictions", None)
            if predictions is not None:
                write_predictions(run_dir / "predictions" / f"{name}.json", labels, predictions)
            ledger.add(name, stage.kind, {**metrics, "seconds": seconds, **result.metrics})
            headline = f"test {task.headline} {metrics[task.headline]:.4f}" if task.headline in metrics else "no task metrics (not a classifier yet)"
            log.info("[%s] %s, %d params, %.3f ms/batch", name, headline, metrics["params"], metrics["latency_ms"])

        executed = set(plan.stages) - completed
        replay(plan.stages, model, ctx, run_dir, completed, execute, wait=None if world.main else lambda name: parallel.barrier())
        if ledger is None:
            return None  # rank 0 alone re-times, reports and returns the objective
        rows = ledger.data["stages"]
        # after any stage ran here, or for rows never re-timed; a resume of a finished ledger re-measures nothing
        if cfg.measure.final_retime and len(rows) > 1 and (executed or any("latency_ms_during_run" not in row["metrics"] for row in rows)):
            final_retime(plan, data, run_dir, ledger, example)
    except BaseException as error:
        waited = _timed_out(error, cfg) if world.distributed else None
        message = waited or (str(error) if isinstance(error, EffitrainError) else f"{type(error).__name__}: {error}")
        if world.distributed:
            parallel.report_failure(message)
            message = parallel.reported_failure() or message  # the process that failed first holds the root cause
        if ledger is not None:
            ledger.finish("failed", message)
        if waited is not None:
            raise TrainingError(waited) from None
        raise
    finally:
        logger.close()
    values = objectives(plan, ledger.data["stages"])
    ledger.data["objective"] = values
    ledger.finish("completed")
    log.info("\n%s", render_text(ledger_table(ledger.data)).rstrip())
    if cfg.report:
        _write_report(run_dir)
    result = tuple(values.values())
    return result[0] if len(result) == 1 else result
