"""Starting the processes of one run, with the engines torch and the cluster tools provide.

Three ways in, one run folder:

- `trainer.devices=N`: the Hydra job resolves the config and the run folder once, then starts N
  workers with torch's elastic agent (`torch.distributed.launcher`, what torchrun runs), passing
  each the resolved config. The agent stops every worker as soon as one fails; the first failure
  becomes the run's one-line error and the ledger's status.
- `torchrun ... -m effitrain run ...`: every rank runs the CLI; rank 0 alone composes the config
  and makes the run folder, then hands both to the others (`follow`); they never start Hydra.
- SLURM / submitit with `tasks_per_node > 1`: every task runs the Hydra job with the same
  pickled config and folder; the job's task environment (submitit's JobEnvironment: rank, task
  count, first host) becomes torch.distributed's RANK, WORLD_SIZE and MASTER_ADDR.

Workers die with the process that started them (Linux PDEATHSIG), so killing a launcher leaves
no orphan training on; `effitrain resume RUN_DIR` continues from the last epoch checkpoint.
"""

from __future__ import annotations

import ctypes
import logging
import logging.config
import os
import signal
import socket
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from effitrain.errors import ConfigError, EffitrainError, TrainingError

log = logging.getLogger("effitrain")

FOLLOW_TIMEOUT_S = 1800  # torchrun followers wait this long for rank 0's config (its pre-run check included)


@dataclass
class Job:
    """What every worker of a run needs (picklable).

    Attributes:
        config: the validated, resolved config as YAML.
        run_dir: the run folder (made by the Hydra job).
        recipe: the recipe's name, for the ledger.
        logging: Hydra's job logging config, resolved (rank 0 logs as the Hydra job would).
        threads_alone: torch's CPU threads of a lone process here (measurements use it).
    """

    config: str
    run_dir: str
    recipe: str
    logging: dict | None
    threads_alone: int


def port_is_free(port: int) -> bool:
    """Whether a TCP port can be bound on this machine now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def check_port(port: int | None) -> None:
    """A fixed rendezvous port must be free (checked before anything starts).

    Raises:
        ConfigError: the port is taken.
    """
    if port is not None and not port_is_free(port):
        raise ConfigError(f"trainer.dist_port = {port}: the port is in use on this machine (allowed: a free port, or null to pick one)")


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when the launcher dies (kill -9 included)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the agent's own shutdown still applies
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)


def _quiet_torch_elastic() -> None:
    """torch's agent logs every failure with a traceback; effitrain reports it in one line."""
    for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def launch_workers(job: Job, devices: int, port: int | None, backend: str, timeout_s: float) -> None:
    """Run `job` on `devices` local processes with torch's elastic agent; return when all end.

    Raises:
        EffitrainError: the first failing process's error, as one line (a user-facing error
            as it was raised; anything else prefixed with the process that failed).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_port(port)
    _quiet_torch_elastic()
    import multiprocessing

    # a spawned worker re-reads the parent's start method; inside a launcher's worker (joblib's
    # loky) that is a method the worker cannot find, so the standard one is set for the launch
    inherited = multiprocessing.get_start_method(allow_none=True)
    foreign = inherited not in (None, "spawn", "fork", "forkserver")
    if foreign:
        multiprocessing.set_start_method("spawn", force=True)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{port or 0}", max_restarts=0, monitor_interval=0.1, start_method="spawn")
    try:
        elastic_launch(config, _worker)(job, backend, timeout_s, os.getpid())
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        raise failure_error(rank, failure.message) from None
    finally:
        if foreign:
            multiprocessing.set_start_method(inherited, force=True)


def failure_error(rank: int, message: Any) -> EffitrainError:
    """The one-line error of a failed process from its elastic error record."""
    text = message.get("message", "") if isinstance(message, dict) else str(message)
    name, _, rest = text.partition(": ")
    known = {cls.__name__: cls for cls in _subclasses(EffitrainError)}
    if name in known:
        return known[name](rest)
    return TrainingError(f"process {rank} failed: {text.strip() or 'no message (see run.log)'}")


def _subclasses(cls: type) -> list[type]:
    return [cls, *[sub for child in cls.__subclasses__() for sub in _subclasses(child)]]


def record_failure(error: BaseException) -> None:
    """Write this process's error where torch's agent reads it (TORCHELASTIC_ERROR_FILE) and
    where rank 0 reads it (the process group's store); one line for errors users can act on."""
    from effitrain.parallel import world

    message = str(error) if isinstance(error, EffitrainError) else f"{type(error).__name__}: {error}"
    world.report_failure(message)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)


def _setup_logging(rank: int, config: dict | None) -> None:
    """Rank 0 logs like the Hydra job (terminal + run.log); the others only their errors."""
    if rank == 0 and config:
        logging.config.dictConfig(config)
        return
    logging.basicConfig(level=logging.WARNING, format=f"[process {rank}] %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("effitrain").setLevel(logging.WARNING)


def _threads(threads_alone: int, local_size: int) -> int:
    """Training threads per process: the cores a lone process uses, shared out."""
    return max(1, threads_alone // local_size)


def _worker(job: Job, backend: str, timeout_s: float, parent: int) -> None:
    """One process of a `trainer.devices` run (started by torch's elastic agent)."""
    _die_with_parent(parent)
    import torch

    from effitrain.parallel import world

    here = world.env_world("effitrain", job.threads_alone, backend)
    _setup_logging(here.rank, job.logging)
    torch.set_num_threads(_threads(job.threads_alone, here.local_size))
    try:
        world.start(here, timeout_s)
        run_job(job)
    except BaseException as error:  # every failure leaves its line for the launcher, then the process ends quietly
        record_failure(error)
        sys.exit(1)
    finally:
        world.stop()


def run_job(job: Job) -> None:
    """Run the stages of `job` as this process's rank (the world is already joined)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from effitrain import pipeline
    from effitrain.config.compose import register_resolvers

    register_resolvers()
    plan = pipeline.make_plan(OmegaConf.create(job.config))
    _stop_on_sigterm()
    pipeline.run_stages(plan, Path(job.run_dir), job.recipe)


class Stopped(BaseException):
    """The launcher stopped this process (another process failed, or the user interrupted)."""


def _stop_on_sigterm() -> None:
    """A SIGTERM (the agent stopping the run) unwinds Python, so rank 0 marks the ledger failed."""
    def stop(signum: int, frame: Any) -> None:
        raise Stopped(f"stopped by signal {signal.Signals(signum).name}")

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, stop)


# -- torchrun -----------------------------------------------------------------------------------


def torchrun_world() -> bool:
    """Whether this process is one rank of several that torchrun (or torch's agent) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def join_torchrun(settings: Any, device: Any) -> Any:
    """Join torchrun's process group (every rank, before Hydra runs anywhere)."""
    import torch

    from effitrain.parallel import world

    here = world.env_world("torchrun", backend=world.choose_backend(settings.dist_backend, device))
    if settings.devices not in (1, here.local_size):
        raise ConfigError(f"trainer.devices = {settings.devices} under torchrun, which started {here.local_size} processes on this "
                          f"machine (allowed: 1, or {here.local_size}; torchrun's --nproc_per_node sets the count)")
    torch.set_num_threads(_threads(here.threads_alone, here.local_size))
    return world.start(here, float(settings.dist_timeout_s))


_HANDED_OUT = [False]


def hand_out(plan_config: str | None, run_dir: str | None, recipe: str | None, error: str | None = None) -> None:
    """Rank 0 under torchrun: give the others the resolved config and run folder (or the error
    that stopped the run before it began, so they end too). Once per run."""
    from effitrain.parallel import world

    if _HANDED_OUT[0]:
        return
    _HANDED_OUT[0] = True
    world.broadcast_object({"config": plan_config, "run_dir": run_dir, "recipe": recipe, "error": error})


def handed_out() -> bool:
    return _HANDED_OUT[0]


def follow() -> int:
    """A torchrun rank other than 0: wait for rank 0's config and folder, then run as this rank.

    Returns:
        The exit code: 0, 1 after a failure of this process, 2 when rank 0 refused the run.
    """
    from effitrain.parallel import world

    message = world.broadcast_object(None)
    if message["error"] is not None:
        return 2  # rank 0 printed the line
    _setup_logging(world.current().rank, None)
    try:
        run_job(Job(message["config"], message["run_dir"], message["recipe"], None, world.current().threads_alone))
    except BaseException as error:
        record_failure(error)
        print(f"error: process {world.current().rank}: {error}", file=sys.stderr)
        return 1
    return 0


# -- SLURM / submitit ---------------------------------------------------------------------------


def join_submitit(settings: Any, device: Any) -> bool:
    """Inside a submitit job with several tasks (SLURM `tasks_per_node`, `nodes`, or the local
    executor): map the job's task environment to torch.distributed and join it. False when the
    job has one task (then `trainer.devices` may start processes itself).

    The rendezvous is the job's first host, on `trainer.dist_port` or a port derived from the job id.
    """
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    import submitit

    from effitrain.parallel import world

    environment = submitit.JobEnvironment()
    if environment.num_tasks <= 1:
        return False
    if settings.devices not in (1, environment.num_tasks // environment.num_nodes):
        raise ConfigError(f"trainer.devices = {settings.devices} in a job of {environment.num_tasks} tasks: each task is one process "
                          "(allowed: 1; hydra.launcher.tasks_per_node sets the count)")
    digits = "".join(char for char in str(environment.job_id) if char.isdigit()) or "0"
    os.environ.update({
        "MASTER_ADDR": environment.hostnames[0] if environment.num_nodes > 1 else "127.0.0.1",
        "MASTER_PORT": str(settings.dist_port or 20000 + int(digits) % 20000),
        "RANK": str(environment.global_rank), "WORLD_SIZE": str(environment.num_tasks),
        "LOCAL_RANK": str(environment.local_rank), "LOCAL_WORLD_SIZE": str(environment.num_tasks // environment.num_nodes),
    })
    here = world.env_world("submitit", backend=world.choose_backend(settings.dist_backend, device))
    import torch

    torch.set_num_threads(_threads(here.threads_alone, here.local_size))
    world.start(here, float(settings.dist_timeout_s))
    if not here.main:
        _setup_logging(here.rank, None)
    return True

