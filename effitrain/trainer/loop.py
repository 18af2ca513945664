"""The training loop: optimizer and schedule, gradient accumulation and clipping, precision,
per-epoch validation with best-checkpoint tracking, early stopping, and resumable checkpoints,
on one process or data-parallel on several (DistributedDataParallel).

Each optimizer step learns from one global batch (`data.batch_size` examples of the seeded
order), split over the processes and into micro-batches (`effitrain.parallel.batches`); each
micro-batch's loss is weighted by its share of the global batch, so a step is the same at any
world size. Validation is scored over disjoint parts of the split and summed, so every process
takes the same best-checkpoint and early-stopping decisions. Checkpoints are written at the end
of every epoch by the group's leader (weights as safetensors, the rest with torch.save, every
process's random state in it). The data order depends only on (seed, epoch), so a run resumed
from an epoch checkpoint ends exactly as an uninterrupted one would.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from effitrain.batch import move
from effitrain.checkpoint import load_state, load_weights, save_state, save_weights
from effitrain.config.schema import TrainerConfig
from effitrain.errors import ConfigError, TrainingError
from effitrain.parallel import world as parallel
from effitrain.parallel.batches import examples, step_batches, strided
from effitrain.precision import PrecisionPolicy
from effitrain.runlog import RunLogger
from effitrain.tasks import Classification, Task
from effitrain.retime import synchronizer
from effitrain.trainer.compile import training_model
from effitrain.trainer.hooks import Hook
from effitrain.trainer.progress import Progress
from effitrain.trainer.replicas import Objective, Replicas

log = logging.getLogger("effitrain")

LossFn = Callable[[nn.Module, Any, Any], Tensor]
SchedulerFactory = Callable[[torch.optim.Optimizer, int], Any]


@dataclass
class FitResult:
    """What `Trainer.fit` did: epochs and steps run, best monitored value and whether it stopped early."""

    epochs: int
    steps: int
    best: float | None
    stopped_early: bool
    compile: str | None = None  # what trainer.compile chose and why (None: eager, not asked)


class Trainer:
    """Trains a model with `loss_fn` and `hooks`, validating and checkpointing every epoch.

    Args:
        settings: loop settings (the `trainer` config section).
        make_optimizer: builds the optimizer from a list of parameters.
        make_scheduler: builds the lr scheduler from the optimizer and the stage's total steps.
        precision: the precision policy (device, autocast, fp16 scaler).
        logger: metrics sink (metrics.jsonl + TensorBoard).
        stage: name of the stage, used in logs.
        checkpoint_dir: folder for this stage's `last.*` and `best.safetensors`.
        task: what a batch is, the default loss and the validation metrics (default: classification).
        loss_fn: `loss_fn(model, inputs, targets) -> loss` (default: the task's loss); an
            nn.Module loss is trained and checkpointed along with the model (e.g. distillation projections).
        hooks: per-step hooks.
            Hooks and the loss with a `logged(trainer)` method add its figures to every logged step.
        label: how logs and the progress bar name the stage (default: `stage`), e.g. "2/5 pruned".
        group: the processes that train this model together (default: every process of the run;
            one process outside a distributed run).
    """

    def __init__(
        self,
        settings: TrainerConfig,
        make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
        make_scheduler: SchedulerFactory,
        precision: PrecisionPolicy,
        logger: RunLogger,
        stage: str,
        checkpoint_dir: Path,
        task: Task | None = None,
        loss_fn: LossFn | None = None,
        hooks: Sequence[Hook] = (),
        label: str | None = None,
        group: parallel.Group | None = None,
    ) -> None:
        self.settings = settings
        self.label = label or stage
        self.make_optimizer = make_optimizer
        self.make_scheduler = make_scheduler
        self.precision = precision
        self.logger = logger
        self.stage = stage
        self.checkpoint_dir = checkpoint_dir
        self.task = task if task is not None else Classification()
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else self.task.loss
        self.hooks = list(hooks)
        self.group = group if group is not None else parallel.whole()
        self.monitor = settings.monitor[len("val_"):]
        if self.monitor not in self.task.metrics:
            allowed = ", ".join(f"val_{metric}" for metric in self.task.metrics)
            raise ConfigError(f"trainer.monitor = {settings.monitor!r}: {self.task.name} reports no such metric (allowed: {allowed})")
        self.epoch = 0
        self.step = 0
        self.total_steps = 0
        self.skipped_in_a_row = 0  # fp16 steps in a row whose loss overflowed
        self.model: nn.Module | None = None
        self.train_model: nn.Module | None = None  # the module training steps call: the model, or its torch.compile
        self.optimizer: torch.optim.Optimizer | None = None

    # -- public -------------------------------------------------------------------------------

    def fit(self, model: nn.Module, train_loader: Iterable, val_loader: Iterable, resume: bool = False) -> FitResult:
        """Train `model` in place; with `resume`, continue from this stage's last checkpoint if any.

        Returns:
            A FitResult. The model ends with the best-by-monitor weights when `restore_best`.

        Raises:
            TrainingError: the loss became NaN/inf outside fp16 loss scaling.
            ConfigError: data that cannot be split over the processes or micro-batches.
        """
        settings, group = self.settings, self.group
        self.model = model.to(self.precision.device)
        loss_module = self.loss_fn if isinstance(self.loss_fn, nn.Module) else None
        if loss_module is not None:
            loss_module.to(self.precision.device)
        steps = step_batches(train_loader, group.rank, group.size, settings.grad_accum_steps,
                             lambda batch: examples(batch, self.task.split), f"[{self.label}] training")
        val_part = strided(val_loader, group.rank, group.size)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if loss_module is not None:  # a loss may share parameters with the model (a head tied to the word embeddings)
            known = {id(p) for p in trainable}
            trainable += [p for p in loss_module.parameters() if p.requires_grad and id(p) not in known]
        self.optimizer = self.make_optimizer(trainable)
        total_steps = settings.max_epochs * len(steps)
        if settings.max_steps is not None:
            total_steps = min(total_steps, settings.max_steps)
        self.total_steps = total_steps  # hooks read it (e.g. a pruning schedule's end)
        scheduler = self.make_scheduler(self.optimizer, total_steps)
        best, stale_epochs, stopped_early = None, 0, False
        if resume and self._last_state_path.exists():
            best, stale_epochs = self._restore(scheduler)
            log.info("[%s] resumed after epoch %d (step %d)", self.label, self.epoch, self.step)
        for hook in self.hooks:
            hook.on_fit_start(self)
        progress = Progress(self.label, total_steps, settings.progress if parallel.is_main() else "off")
        with Replicas(model, group, self.precision.device, settings.sync_batchnorm) as replicas:
            self.train_model, compile_note = self._training_model(model, train_loader, total_steps - self.step)
            replicas.wrap(self.train_model, self.loss_fn)
            try:
                while self.epoch < settings.max_epochs and self.step < total_steps and not stopped_early:
                    metrics = self._run_epoch(steps, replicas, scheduler, total_steps, progress)
                    metrics.update({f"val_{key}": value for key, value in self.validate(model, val_part).items()})
                    self.epoch += 1
                    current = metrics[settings.monitor]
                    if self.task.better(self.monitor, current, best):
                        best, stale_epochs = current, 0
                        if group.leader:
                            save_weights(model, self.checkpoint_dir / "best.safetensors")
                    else:
                        stale_epochs += 1
                    stopped_early = settings.early_stopping_patience is not None and stale_epochs >= settings.early_stopping_patience
                    # every process of the run stops together (peers trained on their own groups too)
                    stopped_early = parallel.any_over(stopped_early, None) if parallel.current().distributed else stopped_early
                    self.logger.log(self.stage, self.step, metrics, epoch=self.epoch)
                    progress.epoch_done(self.epoch - 1, settings.max_epochs, metrics)
                    for hook in self.hooks:
                        hook.on_epoch_end(self, metrics)
                    self._save(scheduler, best, stale_epochs)
            finally:
                progress.close()
        if stopped_early:
            log.info("[%s] early stop: %s did not improve for %d epochs", self.label, settings.monitor, stale_epochs)
        best_path = self.checkpoint_dir / "best.safetensors"
        if settings.restore_best and parallel.any_over(group.leader and best_path.exists(), group):
            if group.leader:
                load_weights(model, best_path)
            parallel.broadcast_module(model, group=group)  # no shared file system needed for the best weights
        return FitResult(epochs=self.epoch, steps=self.step, best=best, stopped_early=stopped_early, compile=compile_note)

    def validate(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        """The task's validation metrics of `model` over `loader`, this process's part of the
        split summed with the other processes' (each example scored once)."""
        sums, count, _, _ = self.task.totals(model, loader, self.precision)
        keys = list(sums)
        totals = parallel.sum_over([*sums.values(), count], self.group)
        return {key: value / max(totals[-1], 1) for key, value in zip(keys, totals)}

    def _training_model(self, model: nn.Module, loader: Iterable, steps: int) -> tuple[nn.Module, str | None]:
        """The module training steps call (`trainer.compile`); a probe or compile step on one
        batch leaves no trace: buffers and random states restored, gradients cleared. Several
        processes follow their leader's choice."""
        setting = self.settings.compile
        if setting is None or setting is False or steps <= 0:
            return model, None
        rng = _rng_state()  # before the loader: starting an iterator draws a seed
        inputs, targets = self.task.split(next(iter(loader)))
        inputs, targets = move(inputs, self.precision.device), move(targets, self.precision.device)
        modules = [module for module in (model, self.loss_fn) if isinstance(module, nn.Module)]
        buffers = [{name: buffer.detach().clone() for name, buffer in module.named_buffers()} for module in modules]

        def step(module: nn.Module) -> None:
            with self.precision.autocast():
                loss = self.loss_fn(module, inputs, targets)
            loss.backward()
            for owner in modules:
                owner.zero_grad(set_to_none=True)

        try:
            if self.group.size > 1 and setting == "auto":  # the leader times it; the others compile only if it chose to
                chosen = training_model(setting, model, step, steps, self.label, synchronizer(self.precision.device)) if self.group.leader else None
                note = parallel.broadcast_object(chosen[1] if chosen else None, self.group)
                if chosen is not None:
                    return chosen[0], note
                return (training_model(True, model, step, steps, self.label)[0] if note and note.startswith("compile auto: compiled") else model), note
            return training_model(setting, model, step, steps, self.label, synchronizer(self.precision.device))
        finally:
            with torch.no_grad():
                for module, saved in zip(modules, buffers):
                    for name, buffer in module.named_buffers():
                        buffer.copy_(saved[name])
            _set_rng_state(rng)

    # -- one epoch ----------------------------------------------------------------------------

    def _run_epoch(self, steps: Any, replicas: Replicas, scheduler: Any, total_steps: int, progress: Progress) -> dict[str, float]:
        settings, precision, model, optimizer = self.settings, self.precision, self.model, self.optimizer
        assert model is not None and optimizer is not None
        steps.set_epoch(self.epoch)  # the data order depends only on (seed, epoch)
        model.train()  # before the hooks, which may set parts of the model otherwise (frozen modules stay in eval mode)
        for hook in self.hooks:
            hook.on_epoch_start(self)
        share = self.group.size  # a micro-batch's mean loss counts as its share of the global batch
        loss_sum, loss_count, samples, started = 0.0, 0, 0, time.perf_counter()
        for step in steps:
            step_loss_sum = torch.zeros((), device=precision.device)
            for index, (batch, size) in enumerate(zip(step.batches, step.sizes)):
                inputs, targets = self.task.split(batch)
                inputs, targets = move(inputs, precision.device), move(targets, precision.device)
                with replicas.accumulating(last=index == len(step.batches) - 1):
                    with precision.autocast():
                        loss = replicas.loss(inputs, targets)
                    step_loss_sum += loss.detach().float() * size
                    weight = size * share / step.total
                    scaled = loss * weight if weight != 1 else loss  # no extra autograd node for a whole batch
                    if precision.scaler is not None:
                        precision.scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
            step_loss = parallel.sum_over([step_loss_sum.item()], self.group)[0] / step.total
            samples += step.total
            self.skipped_in_a_row = 0 if math.isfinite(step_loss) else self.skipped_in_a_row + 1
            if precision.scaler is not None and self.skipped_in_a_row >= precision.max_skipped_steps:
                raise TrainingError(
                    f"[{self.stage}] fp16: {self.skipped_in_a_row} steps in a row overflowed (loss {step_loss}) up to step "
                    f"{self.step + 1}; loss scaling cannot recover. The last good checkpoint is kept in {self.checkpoint_dir} "
                    "(try a lower optimizer.lr, trainer.grad_clip_norm, or precision=bf16)"
                )
            if not math.isfinite(step_loss) and precision.scaler is None:
                raise TrainingError(
                    f"[{self.stage}] loss is {step_loss} at step {self.step + 1} (epoch {self.epoch + 1}) under "
                    f"{precision.used}; the last good checkpoint is kept in {self.checkpoint_dir} "
                    "(try a lower optimizer.lr or trainer.grad_clip_norm)"
                )
            self._optimizer_step()
            scheduler.step()
            self.step += 1
            for hook in self.hooks:
                hook.after_step(self)
            loss_sum += step_loss
            loss_count += 1
            throughput = samples / (time.perf_counter() - started)
            if self.step % settings.log_every_steps == 0:
                logged = {"train_loss": step_loss, "lr": scheduler.get_last_lr()[0], "samples_per_second": throughput}
                for source in [*self.hooks, self.loss_fn]:
                    logged.update(source.logged(self) if hasattr(source, "logged") else {})
                self.logger.log(self.stage, self.step, logged)
                progress.advance(self.step, step_loss, throughput)
            if self.step >= total_steps:
                break
        return {
            "train_loss": loss_sum / max(loss_count, 1),
            "samples_per_second": samples / (time.perf_counter() - started),
        }

    def _optimizer_step(self) -> None:
        """Unscale (fp16), run hooks, clip, step, update the loss scale, clear gradients."""
        model, optimizer, scaler = self.model, self.optimizer, self.precision.scaler
        assert model is not None and optimizer is not None
        if scaler is not None:
            scaler.unscale_(optimizer)
        for hook in self.hooks:
            hook.after_backward(self)
        if self.settings.grad_clip_norm is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip_norm)
        if scaler is not None:
            scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/NaN
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # -- checkpoints --------------------------------------------------------------------------

    @property
    def _last_state_path(self) -> Path:
        return self.checkpoint_dir / "last_state.pt"

    def _save(self, scheduler: Any, best: float | None, stale_epochs: int) -> None:
        """Write the epoch checkpoint (the group's leader): weights first, then the state file
        that marks it complete, with every process's random state."""
        assert self.model is not None and self.optimizer is not None
        rng = parallel.gather_objects(_rng_state(), self.group)
        if not self.group.leader:
            return
        save_weights(self.model, self.checkpoint_dir / "last.safetensors")
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "best": best,
            "stale_epochs": stale_epochs,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler is not None else None,
            "loss": self.loss_fn.state_dict() if isinstance(self.loss_fn, nn.Module) else None,
            "hooks": [hook.state_dict() for hook in self.hooks],
            "rng_per_process": rng,
        }
        save_state(state, self._last_state_path)

    def _restore(self, scheduler: Any) -> tuple[float | None, int]:
        assert self.model is not None and self.optimizer is not None
        state = load_state(self._last_state_path)
        saved = state.get("rng_per_process") or [state["rng"]]  # checkpoints made before processes were counted
        if len(saved) != self.group.size:
            raise ConfigError(f"{self._last_state_path}: written by {len(saved)} process(es), resumed on {self.group.size}; each process "
                              f"continues its own random state (allowed: the same count: a run started with trainer.devices resumes "
                              f"with it, one started by torchrun with torchrun --nproc_per_node={len(saved)} -m effitrain resume RUN_DIR)")
        load_weights(self.model, self.checkpoint_dir / "last.safetensors")
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state["scaler"] is not None:
            self.precision.scaler.load_state_dict(state["scaler"])
        if isinstance(self.loss_fn, nn.Module) and state["loss"] is not None:
            self.loss_fn.load_state_dict(state["loss"])
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)
        _set_rng_state(saved[self.group.rank])
        self.epoch, self.step = state["epoch"], state["step"]
        return state["best"], state["stale_epochs"]


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    python_state = tuple(int(value) for value in state["python"].tolist())
    random.setstate((3, python_state, None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
