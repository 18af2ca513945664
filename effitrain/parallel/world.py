"""Which process of a run this is, and the few collectives effitrain needs between processes.

A run is one process, or `size` processes of one torch.distributed process group (DDP): started
by effitrain itself (`trainer.devices=N`, see `effitrain.parallel.launch`), by `torchrun`, or as
the tasks of a SLURM job (submitit). Rank 0 alone writes the run folder, the ledger and the logs
(`is_main`); every other rank prints only its own errors. Every helper here is a no-op in a
one-process run, so callers never branch on "am I distributed".
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("effitrain")

BACKENDS = ("auto", "gloo", "nccl")
ERROR_KEY = "effitrain/error"  # the first failing rank's message, in the process group's store


@dataclass(frozen=True)
class World:
    """This process's place in the run.

    Attributes:
        rank, size: global rank and number of processes.
        local_rank, local_size: the same on this machine (the CUDA device index is local_rank).
        backend: the torch.distributed backend (None: one process).
        launcher: who started the processes: effitrain, torchrun or submitit (None: one process).
        threads_alone: torch's CPU threads of a lone process on this machine; measurements use it,
            so a latency taken in a multi-process run compares with a one-process run's.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None
    launcher: str | None = None
    threads_alone: int = field(default_factory=torch.get_num_threads)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        """'2 processes (gloo, started by effitrain)', or '1 process'."""
        if not self.distributed:
            return "1 process"
        return f"{self.size} processes ({self.backend}, started by {self.launcher})"


_WORLD = World()


def current() -> World:
    """The world of this process (one process unless `start` was called)."""
    return _WORLD


def is_main() -> bool:
    """Whether this process writes the run folder, the ledger and the logs (rank 0)."""
    return _WORLD.main


def choose_backend(setting: str, device: torch.device) -> str:
    """`auto` is NCCL on CUDA and gloo on the CPU."""
    if setting == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return setting


def start(world: World, timeout_s: float) -> World:
    """Join the process group described by the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT, as torchrun and torch's elastic agent set them) and make `world` current.

    Args:
        timeout_s: how long any collective may wait for the other ranks before it fails (a
            rank that stopped answering ends the job in bounded time).
    """
    global _WORLD
    if world.backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(world.backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _WORLD = world
    return world


def stop() -> None:
    """Leave the process group (if any); the process is one process again."""
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World(threads_alone=_WORLD.threads_alone)


# -- groups: the processes one model trains on ------------------------------------------------


@dataclass(frozen=True)
class Group:
    """The processes that train one model together (data parallel).

    Usually every process of the run; a codistillation peer placed on its own ranks has a
    group of its own.

    Attributes:
        rank, size: this process's rank in the group and the group's size.
        ranks: the group's global ranks (its leader, which writes its checkpoints, first).
        handle: the torch.distributed group (None: the default group of the whole run).
    """

    rank: int = 0
    size: int = 1
    ranks: tuple[int, ...] = (0,)
    handle: Any = None

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def source(self) -> int:
        """The leader's global rank (the source of broadcasts)."""
        return self.ranks[0]


def whole() -> Group:
    """Every process of the run, as one group."""
    return Group(_WORLD.rank, _WORLD.size, tuple(range(_WORLD.size)))


def split(parts: int) -> tuple[int, Group]:
    """Cut the run's processes into `parts` groups of consecutive ranks (every rank calls this,
    in the same order); returns (this process's part, its group)."""
    per_part = _WORLD.size // parts
    part = _WORLD.rank // per_part
    handles = [dist.new_group(list(range(index * per_part, (index + 1) * per_part))) if _WORLD.distributed else None
               for index in range(parts)]
    ranks = tuple(range(part * per_part, (part + 1) * per_part))
    return part, Group(_WORLD.rank - ranks[0], per_part, ranks, handles[part])


# -- collectives (no-ops in one process) --------------------------------------------------------


def _device() -> torch.device:
    """Where collective tensors live: NCCL reduces CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", _WORLD.local_rank) if _WORLD.backend == "nccl" else torch.device("cpu")


def barrier(group: Group | None = None) -> None:
    """Wait until every process of `group` (default: the run) gets here."""
    group = group or whole()
    if group.size > 1:
        dist.barrier(group=group.handle, **({"device_ids": [_WORLD.local_rank]} if _WORLD.backend == "nccl" else {}))


def sum_over(values: Sequence[float], group: Group | None = None) -> list[float]:
    """Element-wise sums of `values` over the processes of `group`, in float64."""
    group = group or whole()
    if group.size == 1:
        return [float(value) for value in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.all_reduce(tensor, group=group.handle)
    return tensor.cpu().tolist()


def any_over(flag: bool, group: Group | None = None) -> bool:
    """True on every process of `group` when it is true on one of them."""
    return sum_over([1.0 if flag else 0.0], group)[0] > 0


def broadcast_object(value: Any, group: Group | None = None) -> Any:
    """The leader's `value` (picklable), on every process of `group`."""
    group = group or whole()
    if group.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=group.source, group=group.handle, device=_device())
    return box[0]


def gather_objects(value: Any, group: Group | None = None) -> list[Any] | None:
    """Every process's `value`, in rank order, on the leader of `group` (None elsewhere)."""
    group = group or whole()
    if group.size == 1:
        return [value]
    gathered: list[Any] = [None] * group.size if group.leader else None  # type: ignore[assignment]
    dist.gather_object(value, gathered, dst=group.source, group=group.handle)
    return gathered


def all_gather_objects(value: Any, group: Group | None = None) -> list[Any]:
    """Every process's `value`, in rank order, on every process of `group`."""
    group = group or whole()
    if group.size == 1:
        return [value]
    gathered: list[Any] = [None] * group.size
    dist.all_gather_object(gathered, value, group=group.handle)
    return gathered


def broadcast_module(module: nn.Module, source: int | None = None, group: Group | None = None) -> None:
    """Copy the parameters and buffers of `module` on global rank `source` (default: the group's
    leader) into the same module on every other process of `group`, in place."""
    group = group or whole()
    if group.size == 1:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            moved = tensor.data.to(_device())
            dist.broadcast(moved, src=group.source if source is None else source, group=group.handle)
            if moved.data_ptr() != tensor.data.data_ptr():
                tensor.data.copy_(moved)


def broadcast_tensors(tensors: dict[str, torch.Tensor], group: Group | None = None) -> dict[str, torch.Tensor]:
    """The leader's tensors (same names and shapes everywhere, e.g. pruning masks), on every
    process of `group`; booleans travel as bytes."""
    group = group or whole()
    if group.size == 1:
        return tensors
    shared = {}
    for name, tensor in tensors.items():
        moved = tensor.to(_device(), torch.uint8 if tensor.dtype == torch.bool else tensor.dtype).contiguous()
        dist.broadcast(moved, src=group.source, group=group.handle)
        shared[name] = moved.to(tensor.device, tensor.dtype)
    return shared


class _GatherRows(torch.autograd.Function):
    """Every process's rows, concatenated in rank order; the gradient of this process's rows is
    the sum over processes of each one's gradient for them (each process's loss reads them all)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any, rows: list[int]) -> torch.Tensor:  # type: ignore[override]
        padded = torch.zeros((max(rows), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[:tensor.shape[0]] = tensor
        parts = [torch.zeros_like(padded) for _ in range(group.size)]
        dist.all_gather(parts, padded.contiguous(), group=group.handle)
        ctx.group, ctx.rows = group, rows
        return torch.cat([part[:count] for part, count in zip(parts, rows)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group.handle)
        start = sum(ctx.rows[:ctx.group.rank])
        return total[start:start + ctx.rows[ctx.group.rank]], None, None


def gather_rows(tensor: torch.Tensor, group: Group | None = None) -> tuple[torch.Tensor, int]:
    """Every process's rows of `tensor` (counts may differ), concatenated in rank order, with
    gradients back to each process's own rows; and the index where this process's rows start."""
    group = group or whole()
    if group.size == 1:
        return tensor, 0
    rows = [int(count) for count in sum_over([tensor.shape[0] if index == group.rank else 0 for index in range(group.size)], group)]
    return _GatherRows.apply(tensor, group, rows), sum(rows[:group.rank])


# -- failures -----------------------------------------------------------------------------------


def report_failure(message: str) -> None:
    """Leave this rank's error in the process group's store (the first one stays), so rank 0
    can write the root cause into the ledger; never raises."""
    if not (_WORLD.distributed and dist.is_initialized()):
        return
    try:
        store = dist.distributed_c10d._get_default_store()
        store.compare_set(ERROR_KEY, "", f"process {_WORLD.rank}: {message}")
    except Exception:  # the store may be gone with the failure; the launcher still reports it
        pass


def reported_failure() -> str | None:
    """The first error a rank left in the store, if any (a short wait; never raises)."""
    if not (_WORLD.distributed and dist.is_initialized()):
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.check([ERROR_KEY]):
            return store.get(ERROR_KEY).decode()
    except Exception:
        pass
    return None


def env_world(launcher: str, threads_alone: int | None = None, backend: str | None = None) -> World:
    """The world torchrun (or torch's elastic agent) describes in the environment."""
    size = int(os.environ["WORLD_SIZE"])
    return World(
        rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_size=int(os.environ.get("LOCAL_WORLD_SIZE", size)), backend=backend, launcher=launcher,
        threads_alone=threads_alone or torch.get_num_threads(),
    )
