"""Training batches per optimizer step, for any number of processes and accumulation steps.

`data.batch_size` is the GLOBAL batch: the examples one optimizer step learns from, whatever the
number of processes. Each step takes the next `batch_size` examples of the seeded order (the
same order a one-process run uses); process r of w takes the r-th of w near-equal slices of them
and cuts its slice into micro-batches for gradient accumulation. The trainer weights each
micro-batch's mean loss by its share of the global batch, so a step's gradient is the mean over
the global batch as in one process, at any world size. Validation is split into disjoint strided
parts, so each example is scored exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
from torch.utils.data import DataLoader, Sampler, Subset

from effitrain.batch import batch_size as count_of
from effitrain.data.bundle import SeededShuffle
from effitrain.errors import ConfigError


@dataclass
class Step:
    """One optimizer step's data on this process.

    Attributes:
        batches: this process's micro-batches, as the loader yields them.
        sizes: examples in each micro-batch.
        total: examples in the whole global batch (every process's together).
    """

    batches: list[Any]
    sizes: list[int]
    total: int


def plan_steps(order: list[int], batch_size: int, rank: int, world: int, accum: int) -> list[list[list[int]]]:
    """Per optimizer step, this process's micro-batches as lists of example indices.

    Each step's global batch is the next `batch_size` indices of `order`; this process takes the
    rank-th of `world` near-equal slices; the slice is cut into the same number of micro-batches
    on every process (at most `accum`, fewer only when a short last batch leaves a slice with
    fewer examples), so every process makes the same collective calls. A last batch with fewer
    examples than processes is left out: a process with nothing to learn from cannot join a step.
    """
    steps = []
    for start in range(0, len(order), batch_size):
        chunk = np.asarray(order[start:start + batch_size])
        if len(chunk) < world:
            break
        shares = np.array_split(chunk, world)
        parts = min(accum, min(len(share) for share in shares))
        steps.append([part.tolist() for part in np.array_split(shares[rank], parts)])
    return steps


class _MicroBatches(Sampler[list[int]]):
    """Yields the planned micro-batches of the current epoch, in order (a batch sampler)."""

    def __init__(self, owner: "GlobalBatches") -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.owner.plan():
            yield from step

    def __len__(self) -> int:
        return sum(len(step) for step in self.owner.plan())


class GlobalBatches:
    """The steps of a training loader whose sampler is a `SeededShuffle`, for one process.

    Args:
        loader: the run's training loader; its batch size is the global batch.
        rank, world: this process and the number of processes sharing each step.
        accum: micro-batches per step (gradient accumulation).
        seed: the shuffle seed (default: the loader sampler's).
    """

    def __init__(self, loader: DataLoader, rank: int = 0, world: int = 1, accum: int = 1, seed: int | None = None) -> None:
        self.length = len(loader.dataset)  # type: ignore[arg-type]
        self.batch_size = int(loader.batch_size or 1)
        self.rank, self.world, self.accum = rank, world, accum
        self.sampler = SeededShuffle(self.length, loader.sampler.seed if seed is None else seed)  # type: ignore[union-attr]
        self._plans: dict[int, list[list[list[int]]]] = {}
        self.loader = DataLoader(loader.dataset, batch_sampler=_MicroBatches(self), collate_fn=loader.collate_fn,
                                 num_workers=loader.num_workers, pin_memory=loader.pin_memory)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def plan(self) -> list[list[list[int]]]:
        epoch = self.sampler.epoch
        if epoch not in self._plans:
            self._plans = {epoch: plan_steps(list(self.sampler), self.batch_size, self.rank, self.world, self.accum)}
        return self._plans[epoch]

    def totals(self) -> list[int]:
        """Examples in each step's global batch this epoch."""
        sizes = [min(self.batch_size, self.length - start) for start in range(0, self.length, self.batch_size)]
        return sizes[:len(self.plan())]

    def __len__(self) -> int:
        return len(self.plan())

    def __iter__(self) -> Iterator[Step]:
        plan, totals = self.plan(), self.totals()
        micro = iter(self.loader)
        for step, total in zip(plan, totals):
            batches = [next(micro) for _ in step]
            yield Step(batches, [len(indices) for indices in step], total)


class SingleBatches:
    """Steps of any iterable of batches: one batch per step, one process, no accumulation."""

    def __init__(self, loader: Iterable, sizes: Any) -> None:
        self.loader = loader
        self.sizes = sizes  # batch -> its example count

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.loader, "set_epoch", None) or getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Step]:
        for batch in self.loader:
            size = self.sizes(batch)
            yield Step([batch], [size], size)


def check_divides(batch_size: int, world: int, accum: int, where: str) -> None:
    """The global batch must split evenly into processes x micro-batches.

    Raises:
        ConfigError: naming the nearest batch sizes that would.
    """
    parts = world * accum
    if batch_size % parts:
        lower, upper = batch_size - batch_size % parts, batch_size + parts - batch_size % parts
        choices = f"{lower} or {upper}" if lower else str(upper)
        raise ConfigError(f"{where} = {batch_size} does not split into {world} process(es) x {accum} micro-batch(es) "
                          f"(trainer.devices x trainer.grad_accum_steps = {parts}; allowed: a multiple of {parts}, e.g. {choices})")


def step_batches(loader: Iterable, rank: int, world: int, accum: int, sizes: Any, where: str) -> Any:
    """The trainer's steps for `loader` on this process (see GlobalBatches).

    Args:
        sizes: batch -> example count (the task's split, then count).
        where: names the stage in errors.

    Raises:
        ConfigError: several processes or micro-batches on data effitrain cannot split, or a
            global batch that does not split evenly.
    """
    own = getattr(loader, "step_batches", None)  # data that knows its own steps (e.g. codistillation peers)
    if own is not None:
        return own(rank, world, accum)
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, SeededShuffle) and loader.batch_size:
        # its own sampler: the run's loader stays at epoch 0 for whoever reads it next (saliency
        # batches, calibration), whatever earlier stages trained, on one process or many
        check_divides(int(loader.batch_size), world, accum, "data.batch_size")
        return GlobalBatches(loader, rank, world, accum)
    if world > 1 or accum > 1:
        raise ConfigError(f"{where}: the training data is a {type(loader).__name__} without effitrain's SeededShuffle sampler, "
                          "which cannot be split across processes or micro-batches (allowed: trainer.devices=1 and "
                          "trainer.grad_accum_steps=1, or a DataLoader as effitrain.data.make_bundle builds it)")
    return SingleBatches(loader, sizes)


def strided(loader: Iterable, rank: int, world: int) -> Iterable:
    """This process's part of an evaluation loader: examples rank, rank + world, … (disjoint
    parts that together cover the split exactly once)."""
    if world == 1:
        return loader
    if not isinstance(loader, DataLoader):
        raise ConfigError(f"validation data is a {type(loader).__name__}, which cannot be split across processes (allowed: a DataLoader)")
    dataset = loader.dataset
    return DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=loader.batch_size,  # type: ignore[arg-type]
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers)


def examples(batch: Any, split: Any) -> int:
    """How many examples a loader's batch holds (inputs as the task splits them)."""
    return count_of(split(batch)[0])
