"""The training loop: hooks, accumulation, clipping, early stopping, NaN handling, schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from effitrain.data import SeededShuffle
from effitrain.errors import TrainingError
from effitrain.precision import build_precision
from effitrain.runlog import RunLogger
from effitrain.trainer import Hook, Trainer
from effitrain.trainer.schedule import lr_multiplier

from conftest import schedule, trainer_config


def _loaders(samples: int = 64, batch: int = 8) -> tuple[DataLoader, DataLoader]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(samples, 4, generator=generator)
    labels = (inputs[:, 0] > 0).long()
    dataset = TensorDataset(inputs, labels)
    return DataLoader(dataset, batch_size=batch, sampler=SeededShuffle(samples, 0)), DataLoader(dataset, batch_size=32)


def _trainer(tmp_path: Path, lr: float = 0.1, hooks=(), **settings) -> Trainer:
    return Trainer(
        trainer_config(**{"max_epochs": 2, **settings}),
        lambda params: torch.optim.SGD(params, lr=lr),
        schedule(),
        build_precision("fp32", torch.device("cpu")),
        RunLogger(tmp_path, tensorboard=False),
        "train",
        tmp_path / "checkpoints",
        hooks=hooks,
    )


class Exploding(nn.Module):
    """A linear layer whose logits are multiplied by `factor` (nan or inf: a diverged model)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.factor = factor

    def forward(self, inputs):
        return self.linear(inputs) * self.factor


class CountingHook(Hook):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_fit_start(self, trainer): self.calls.append("fit_start")
    def on_epoch_start(self, trainer): self.calls.append("epoch_start")
    def after_backward(self, trainer): self.calls.append("backward")
    def after_step(self, trainer): self.calls.append("step")
    def on_epoch_end(self, trainer, metrics): self.calls.append("epoch_end")


def test_hooks_fire_once_per_optimizer_step_with_accumulation(tmp_path: Path) -> None:
    hook = CountingHook()
    train, val = _loaders(samples=64, batch=24)  # the global batch: 3 steps per epoch, the last one of 16 examples
    result = _trainer(tmp_path, hooks=[hook], grad_accum_steps=3).fit(nn.Linear(4, 2), train, val)
    assert result.steps == 2 * math.ceil(64 / 24)  # the short batch at the epoch end still steps
    assert hook.calls.count("step") == hook.calls.count("backward") == result.steps
    assert hook.calls[:2] == ["fit_start", "epoch_start"] and hook.calls.count("epoch_end") == 2


def test_accumulation_keeps_the_step_of_the_whole_global_batch(tmp_path: Path) -> None:
    """3 micro-batches of 8 (and a short last batch of 16 in micro-batches of 6, 5, 5) give the
    same weights as whole batches of 24: each micro-batch's loss counts by its share."""
    models = []
    for accum in (1, 3):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        train, val = _loaders(samples=64, batch=24)
        _trainer(tmp_path / str(accum), grad_accum_steps=accum, restore_best=False).fit(model, train, val)
        models.append(model)
    assert torch.allclose(models[0].weight, models[1].weight, rtol=1e-5, atol=1e-6)


def test_a_global_batch_that_does_not_split_is_refused(tmp_path: Path) -> None:
    from effitrain.errors import ConfigError

    train, val = _loaders(samples=64, batch=8)
    with pytest.raises(ConfigError, match="data.batch_size = 8 does not split into 1 process.*allowed: a multiple of 3, e.g. 6 or 9"):
        _trainer(tmp_path, grad_accum_steps=3).fit(nn.Linear(4, 2), train, val)


def test_hook_runs_after_each_optimizer_step(tmp_path: Path) -> None:
    class ZeroFirstWeight(Hook):  # what a pruning mask hook does
        def after_step(self, trainer):
            with torch.no_grad():
                trainer.model.weight[0, 0] = 0.0

    model = nn.Linear(4, 2)
    train, val = _loaders()
    _trainer(tmp_path, hooks=[ZeroFirstWeight()], restore_best=False).fit(model, train, val)
    assert model.weight[0, 0].item() == 0.0 and model.weight[1, 1].item() != 0.0


def test_max_steps_stops_mid_epoch(tmp_path: Path) -> None:
    train, val = _loaders()
    assert _trainer(tmp_path, max_steps=3, max_epochs=5).fit(nn.Linear(4, 2), train, val).steps == 3


def test_gradient_clipping_bounds_the_update(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    before, before_bias = model.weight.detach().clone(), model.bias.detach().clone()
    train, val = _loaders()
    _trainer(tmp_path, lr=1.0, max_steps=1, grad_clip_norm=1e-3, restore_best=False).fit(model, train, val)
    bias_before = before_bias
    change = torch.cat([(model.weight - before).flatten(), (model.bias - bias_before).flatten()]).norm()
    # one SGD step at lr 1 moves every parameter by exactly its clipped gradient: norm 1e-3
    assert change.item() == pytest.approx(1e-3, rel=1e-4)


def test_nan_loss_in_fp32_stops_with_clear_error(tmp_path: Path) -> None:
    train, val = _loaders()
    with pytest.raises(TrainingError, match=r"loss is nan at step 1 \(epoch 1\) under fp32"):
        _trainer(tmp_path).fit(Exploding(float("nan")), train, val)


def test_early_stopping_and_best_weights(tmp_path: Path) -> None:
    train, val = _loaders()
    # lr 0 never improves after epoch 1: patience 2 stops after epoch 3
    result = _trainer(tmp_path, lr=0.0, max_epochs=10, early_stopping_patience=2, monitor="val_loss").fit(nn.Linear(4, 2), train, val)
    assert result.stopped_early and result.epochs == 3


def test_schedules_against_formula() -> None:
    assert lr_multiplier(0, "cosine", 0, 100, 0.0) == pytest.approx(1.0)
    assert lr_multiplier(50, "cosine", 0, 100, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(100, "cosine", 0, 100, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(4, "linear", 10, 110, 0.0) == pytest.approx(0.5)  # warm-up: (4+1)/10
    assert lr_multiplier(60, "linear", 10, 110, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(500, "constant", 10, 110, 0.0) == 1.0


def test_seeded_shuffle_depends_only_on_seed_and_epoch() -> None:
    first, second = SeededShuffle(20, 3), SeededShuffle(20, 3)
    second.set_epoch(1)
    second.set_epoch(0)
    assert list(first) == list(second)
    first.set_epoch(1)
    assert list(first) != list(second) and sorted(first) == list(range(20))


def test_fp16_stops_when_every_step_overflows(tmp_path: Path) -> None:
    """fp16 skips overflowing steps; when it can never recover it stops instead of 'completing'."""
    if not torch.cuda.is_available():
        pytest.skip("fp16 training needs a CUDA device")

    trainer = _trainer(tmp_path)
    trainer.precision = build_precision("fp16", torch.device("cuda"), max_skipped_steps=5)
    train, val = _loaders()
    with pytest.raises(TrainingError, match="5 steps in a row overflowed"):
        trainer.fit(Exploding(float("inf")), train, val)


def test_epoch_lines_are_rounded_for_people_and_follow_stdout(capsys) -> None:
    import logging

    from effitrain.runlog import ConsoleHandler
    from effitrain.trainer.progress import readable

    assert readable({"train_loss": 0.27763, "samples_per_second": 7636.83, "val_accuracy": 0.98518}) == \
        "train_loss 0.2776  val_accuracy 0.9852  7,637 samples/s"
    handler = ConsoleHandler()  # built before stdout is swapped, as Hydra's logging config does
    record = logging.makeLogRecord({"msg": "above the bar", "levelno": logging.INFO})
    import io
    import sys

    swapped, original = io.StringIO(), sys.stdout
    sys.stdout = swapped  # what Rich's live display does while a progress bar is shown
    try:
        handler.emit(record)
    finally:
        sys.stdout = original
    assert swapped.getvalue() == "above the bar\n"
