"""The training loop: optimizer and schedule, gradient accumulation and clipping, precision,
per-epoch validation with best-checkpoint tracking, early stopping, and resumable checkpoints.

Checkpoints are written at the end of every epoch (weights as safetensors, the rest with
torch.save). The data order depends only on (seed, epoch) and the RNG states are saved, so a
run resumed from an epoch checkpoint ends exactly as an uninterrupted one would.
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

from effitrain.batch import batch_size, move
from effitrain.checkpoint import load_state, load_weights, save_state, save_weights
from effitrain.config.schema import TrainerConfig
from effitrain.errors import ConfigError, TrainingError
from effitrain.precision import PrecisionPolicy
from effitrain.runlog import RunLogger
from effitrain.tasks import Classification, Task
from effitrain.retime import synchronizer
from effitrain.trainer.compile import training_model
from effitrain.trainer.hooks import Hook
from effitrain.trainer.progress import Progress

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
        """
        settings = self.settings
        self.model = model.to(self.precision.device)
        loss_module = self.loss_fn if isinstance(self.loss_fn, nn.Module) else None
        if loss_module is not None:
            loss_module.to(self.precision.device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if loss_module is not None:
            trainable += [p for p in loss_module.parameters() if p.requires_grad]
        self.optimizer = self.make_optimizer(trainable)
        steps_per_epoch = math.ceil(len(train_loader) / settings.grad_accum_steps)  # type: ignore[arg-type]
        total_steps = settings.max_epochs * steps_per_epoch
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
        self.train_model, compile_note = self._training_model(model, train_loader, total_steps - self.step)
        progress = Progress(self.label, total_steps, settings.progress)
        try:
            while self.epoch < settings.max_epochs and self.step < total_steps and not stopped_early:
                metrics = self._run_epoch(train_loader, scheduler, total_steps, progress)
                metrics.update({f"val_{key}": value for key, value in self.task.evaluate(model, val_loader, self.precision).items()})
                self.epoch += 1
                current = metrics[settings.monitor]
                if self.task.better(self.monitor, current, best):
                    best, stale_epochs = current, 0
                    save_weights(model, self.checkpoint_dir / "best.safetensors")
                else:
                    stale_epochs += 1
                stopped_early = settings.early_stopping_patience is not None and stale_epochs >= settings.early_stopping_patience
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
        if settings.restore_best and best_path.exists():
            load_weights(model, best_path)
        return FitResult(epochs=self.epoch, steps=self.step, best=best, stopped_early=stopped_early, compile=compile_note)

    def _training_model(self, model: nn.Module, loader: Iterable, steps: int) -> tuple[nn.Module, str | None]:
        """The module training steps call (`trainer.compile`); a probe or compile step on one
        batch leaves no trace: buffers and random states restored, gradients cleared."""
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
            return training_model(setting, model, step, steps, self.label, synchronizer(self.precision.device))
        finally:
            with torch.no_grad():
                for module, saved in zip(modules, buffers):
                    for name, buffer in module.named_buffers():
                        buffer.copy_(saved[name])
            _set_rng_state(rng)

    # -- one epoch ----------------------------------------------------------------------------

    def _run_epoch(self, loader: Iterable, scheduler: Any, total_steps: int, progress: Progress) -> dict[str, float]:
        settings, precision, model, optimizer = self.settings, self.precision, self.model, self.optimizer
        assert model is not None and optimizer is not None
        # the data order depends only on (seed, epoch): a loader (or its sampler) that can be told the epoch is
        set_epoch = getattr(loader, "set_epoch", None) or getattr(getattr(loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(self.epoch)
        for hook in self.hooks:
            hook.on_epoch_start(self)
        model.train()
        accum = settings.grad_accum_steps
        batches = len(loader)  # type: ignore[arg-type]
        loss_sum, loss_count, samples, started = 0.0, 0, 0, time.perf_counter()
        window_loss = torch.zeros((), device=precision.device)
        for index, batch in enumerate(loader):
            inputs, targets = self.task.split(batch)
            inputs, targets = move(inputs, precision.device), move(targets, precision.device)
            with precision.autocast():
                loss = self.loss_fn(self.train_model, inputs, targets)
            window_loss += loss.detach()
            scaled = loss / accum if accum > 1 else loss  # no extra autograd node without accumulation
            if precision.scaler is not None:
                precision.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            samples += batch_size(inputs)
            if (index + 1) % accum and index + 1 < batches:
                continue
            step_loss = window_loss.item() / ((index % accum) + 1)
            window_loss.zero_()
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
        """Write the epoch checkpoint: weights first, then the state file that marks it complete."""
        assert self.model is not None and self.optimizer is not None
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
            "rng": _rng_state(),
        }
        save_state(state, self._last_state_path)

    def _restore(self, scheduler: Any) -> tuple[float | None, int]:
        assert self.model is not None and self.optimizer is not None
        state = load_state(self._last_state_path)
        load_weights(self.model, self.checkpoint_dir / "last.safetensors")
        self.optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler is not None and state["scaler"] is not None:
            self.precision.scaler.load_state_dict(state["scaler"])
        if isinstance(self.loss_fn, nn.Module) and state["loss"] is not None:
            self.loss_fn.load_state_dict(state["loss"])
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)
        _set_rng_state(state["rng"])
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
