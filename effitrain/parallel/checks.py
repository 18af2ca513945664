"""Checks of a multi-process run's settings against this machine, the data and every stage,
made before any process starts (one line each)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from effitrain.errors import ConfigError
from effitrain.parallel import world as parallel
from effitrain.parallel.batches import check_divides
from effitrain.parallel.launch import check_port


def check_processes(cfg: DictConfig, device: torch.device) -> None:
    """`trainer.devices` and its settings fit this machine, the data and every stage's
    accumulation (checked before any process starts).

    Raises:
        ConfigError: the first problem found.
    """
    settings = cfg.trainer
    devices = int(settings.devices)
    backend = parallel.choose_backend(settings.dist_backend, device)
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(f"trainer.dist_backend = 'nccl' needs CUDA devices; this run is on {device} (allowed here: gloo, auto)")
    if devices > 1 and device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"device = {cfg.device!r} names one GPU, and trainer.devices = {devices} needs {devices} "
                              "(allowed: device=cuda or auto, one process per GPU; or trainer.devices=1)")
        if devices > torch.cuda.device_count():
            raise ConfigError(f"trainer.devices = {devices}: only {torch.cuda.device_count()} CUDA device(s) here "
                              f"(allowed: 1..{torch.cuda.device_count()})")
    world = parallel.current()
    processes = world.size if world.distributed else devices
    batch = cfg.data.get("batch_size")
    if isinstance(batch, int) and batch > 0:
        accums = {("trainer.grad_accum_steps", int(settings.grad_accum_steps))}
        for name, stage in cfg.stage.items():
            accum = ((stage.get("trainer") or {}).get("grad_accum_steps"))
            if accum is not None:
                accums.add((f"stage.{name}.trainer.grad_accum_steps", int(accum)))
        for where, accum in sorted(accums):
            if processes > 1 or accum > 1:
                check_divides(batch, processes, accum, "data.batch_size")
    if devices > 1 and not world.distributed:
        check_port(settings.dist_port)
