"""trainer.compile: the auto decision from (fake) timings, the probe leaving the run untouched,
the `true` failure line, and the checks before any work. No timed assertions: real speed is
`benchmarks/compile_speed.py`'s job."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from effitrain.data import SeededShuffle
from effitrain.errors import ConfigError, TrainingError
from effitrain.precision import build_precision
from effitrain.runlog import RunLogger
from effitrain.trainer import Trainer
from effitrain.trainer import compile as compiling
from effitrain.trainer.compile import Probe, check_compiler, probe, training_model

from conftest import run_cli, schedule, trainer_config


def test_auto_keeps_compiled_only_when_clearly_faster() -> None:
    faster = Probe(eager_ms=100.0, compiled_ms=80.0, compile_s=30.0)
    assert faster.compiled_wins
    assert faster.describe(500) == ("compile auto: compiled; eager 100.0 ms/step, compiled 80.0 ms/step (1.25x, 30.0 s to compile); "
                                    "saves ~10 s over 500 steps")
    within_noise = Probe(eager_ms=100.0, compiled_ms=97.0, compile_s=30.0)
    assert not within_noise.compiled_wins
    assert within_noise.describe(500).startswith("compile auto: eager; eager 100.0 ms/step, compiled 97.0 ms/step (1.03x")
    slower = Probe(eager_ms=100.0, compiled_ms=140.0, compile_s=30.0)
    assert not slower.compiled_wins and "(0.71x" in slower.describe(10)
    short = Probe(eager_ms=4.0, short=True)
    assert not short.compiled_wins
    assert short.describe(300) == ("compile auto: eager; this fit is ~1 s of eager steps (300 x 4.0 ms), under 60 s: "
                                   "too short for a compile (tens of seconds on a CPU) to pay back")
    failed = Probe(eager_ms=100.0, error="Unsupported: hooks")
    assert not failed.compiled_wins and "torch.compile failed on this model (Unsupported: hooks)" in failed.describe(10)


def test_probe_interleaves_and_reports_a_failed_compile() -> None:
    calls: list[str] = []
    model = nn.Linear(2, 2)

    class Fake(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    def step(module):
        calls.append("compiled" if isinstance(module, Fake) else "eager")

    measured, compiled = probe(step, model, rounds=3, compile_model=Fake)
    assert isinstance(compiled, Fake) and measured.compile_s is not None
    assert calls == ["eager", "eager", "compiled"] + ["eager", "compiled"] * 3  # warm-up, eager, compile, then alternating rounds
    calls.clear()
    measured, compiled = probe(step, model, compile_model=Fake, steps=100)  # ~0 ms x 100 steps: not worth a compile
    assert compiled is None and measured.short and calls == ["eager", "eager"]
    assert measured.describe(100).startswith("compile auto: eager; this fit is ~0 s of eager steps (100 x ")

    def broken(module):
        raise RuntimeError("dynamo cannot trace this\nmore detail")

    measured, compiled = probe(lambda module: None, model, compile_model=broken)
    assert compiled is None and measured.error == "RuntimeError: dynamo cannot trace this"


def test_true_fails_with_one_line_and_false_never_compiles(monkeypatch) -> None:
    model = nn.Linear(2, 2)
    assert training_model(False, model, lambda m: None, 10, "s") == (model, None)

    def step(module):
        if module is not model:
            raise RuntimeError("inductor: no kernel")

    monkeypatch.setattr(compiling, "compiled_model", lambda module: nn.Sequential(module))
    with pytest.raises(TrainingError, match=r"\[s\] trainer.compile = true: torch.compile failed on this model \(RuntimeError: inductor: no kernel\)"):
        training_model(True, model, step, 10, "s")


class Noisy(nn.Module):
    """BatchNorm statistics and dropout: what a careless probe would change."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))

    def forward(self, inputs):
        return self.body(inputs)


def _fit(tmp_path: Path, setting) -> tuple[dict[str, torch.Tensor], object]:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(48, 4, generator=generator)
    dataset = TensorDataset(inputs, (inputs[:, 0] > 0).long())
    train = DataLoader(dataset, batch_size=8, sampler=SeededShuffle(48, 0))
    torch.manual_seed(0)
    model = Noisy()
    trainer = Trainer(trainer_config(max_epochs=2, compile=setting), lambda params: torch.optim.SGD(params, lr=0.1), schedule(),
                      build_precision("fp32", torch.device("cpu")), RunLogger(tmp_path, tensorboard=False), "train", tmp_path / "ck")
    result = trainer.fit(model, train, DataLoader(dataset, batch_size=16))
    return {key: value.clone() for key, value in model.state_dict().items()}, result


def test_auto_probe_leaves_training_exactly_as_without_it(tmp_path, monkeypatch) -> None:
    # a stand-in compiler (the same module): the probe runs its steps, picks eager, and must leave no trace
    monkeypatch.setattr(compiling, "compiled_model", lambda module: module)
    monkeypatch.setattr(compiling, "MIN_FIT_S", 0)  # probe even this short fit
    monkeypatch.setattr(compiling, "_time", lambda call, sync: call() or 1.0)  # equal timings: eager, whatever the machine does
    plain, _ = _fit(tmp_path / "a", False)
    probed, result = _fit(tmp_path / "b", "auto")
    assert result.compile is not None and result.compile.startswith("compile auto: eager; eager ")
    assert all(torch.equal(plain[key], probed[key]) for key in plain)


def test_settings_are_checked_before_any_work(workdir, monkeypatch) -> None:
    bad = run_cli("run", "recipe=quickstart", "trainer.compile=sometimes", cwd=workdir, timeout=120)
    assert bad.returncode == 2 and "trainer.compile = 'sometimes'" in bad.stderr and "true, false or auto" in bad.stderr
    assert "Traceback" not in bad.stderr
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match=r"stage.s.trainer.compile = 'auto': torch.compile on the CPU needs a C\+\+ compiler"):
        check_compiler("auto", "cpu", "stage.s.trainer.compile")
    check_compiler(False, "cpu")
