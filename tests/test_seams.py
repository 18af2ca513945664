"""The seams: a user's own task, stage kind, model and data plug in from outside effitrain; sweep
objectives come from validation; the config is checked once; files are checked before work."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from effitrain.config import CONF_DIR

from conftest import run_cli_batch, TINY, assert_refused, read_summary, run_cli

PACKAGE = CONF_DIR.parent / "effitrain" if (CONF_DIR.parent / "effitrain").is_dir() else CONF_DIR.parent


def write_recipe(folder: Path, name: str, text: str) -> str:
    """Write a user's recipe into their own config folder; return the searchpath override."""
    (folder / "recipe").mkdir(parents=True, exist_ok=True)
    (folder / "recipe" / f"{name}.yaml").write_text(text)
    return f"hydra.searchpath=[file://{folder}]"


REGRESSION = """# @package _global_
# A regression task with the user's own data, model, task and stage kind.
defaults:
  - /stage@stage.fit: train
  - /stage@stage.evaluate: evaluate
data:
  _target_: userplugins.build_regression
  num_samples: 400
  batch_size: 32
model:
  _target_: userplugins.TinyNet
  num_classes: 1
  width: 16
  in_features: 8
task:
  _target_: userplugins.Regression
optimizer:
  lr: 0.01
trainer:
  max_epochs: 20
  monitor: val_mse
objective:
  - {metric: val_mse, direction: minimize}
  - {metric: params, direction: minimize}
stage:
  shrink:
    _target_: userplugins.Shrink
    factor: 0.5
"""


def test_a_users_task_stage_model_and_data_run_through_the_cli(workdir: Path) -> None:
    searchpath = write_recipe(workdir / "myconf", "regress", REGRESSION)
    result = run_cli("run", "recipe=regress", searchpath, "measure.repeats=10", "measure.warmup=1", "hydra.run.dir=run",
                     cwd=workdir, user_code=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(workdir / "run")
    assert summary["task"] == "Regression" and summary["headline"] == "mse"
    rows = {row["name"]: row for row in summary["stages"]}
    assert list(rows) == ["fit", "evaluate", "shrink"] and rows["shrink"]["kind"] == "shrink"
    fit, shrunk = rows["fit"]["metrics"], rows["shrink"]["metrics"]
    assert set(fit) >= {"mse", "mae", "val_mse", "val_mae", "params", "latency_ms"} and "accuracy" not in fit
    assert fit["mse"] < 1.0  # the linear target is learnt (its variance is ~8)
    assert shrunk["shrunk_layers"] == 2 and shrunk["factor"] == 0.5 and shrunk["mse"] > fit["mse"]
    assert summary["objective"] == {"val_mse": shrunk["val_mse"], "params": shrunk["params"]}
    assert not (workdir / "run" / "predictions").exists()  # a regression task predicts no labels
    assert "mse" in result.stdout  # the ledger's headline column


def test_a_users_own_model_class_gets_only_the_arguments_written(workdir: Path) -> None:
    """The README's pattern, as the issue tried it: the default model group's keys must not leak in."""
    searchpath = write_recipe(workdir / "myconf", "mine", """# @package _global_
# My own model on digits.
defaults:
  - /stage@stage.train: train
  - override /data: digits
model:
  _target_: userplugins.TinyNet
  num_classes: ${data.num_classes}
  width: 48
trainer:
  max_epochs: 2
""")
    result = run_cli("run", "recipe=mine", searchpath, "measure.repeats=10", "measure.warmup=1", "hydra.run.dir=run", cwd=workdir, user_code=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_summary(workdir / "run")["stages"]
    assert row["metrics"]["params"] == (64 * 48 + 48) + (48 * 10 + 10)
    result = run_cli("run", "recipe=mine", searchpath, "+model.depth=3", cwd=workdir, user_code=True)
    assert result.returncode == 2 and "unexpected keyword argument 'depth'" in result.stderr


def test_a_recipe_that_picks_no_model_is_told_how(workdir: Path) -> None:
    searchpath = write_recipe(workdir / "myconf", "nomodel", "# @package _global_\n# No model.\ndefaults:\n  - /stage@stage.train: train\n  - override /data: digits\n")
    assert_refused(run_cli("run", "recipe=nomodel", searchpath, cwd=workdir),
                   "model: no model chosen (allowed: model=bert|cnn|mlp|torchvision, or `model: {_target_: your.Class, ...}` in your recipe)", workdir)


def test_objectives_come_from_validation_and_cost_in_the_order_configured(tmp_path: Path) -> None:
    from effitrain.config.compose import compose
    from effitrain.pipeline import run

    cfg = compose([*TINY, "objective=[{metric: val_loss, direction: minimize}, {metric: latency_ms, direction: minimize, stage: train}]"])
    values = run(cfg, tmp_path, "baseline")
    rows = {row["name"]: row["metrics"] for row in read_summary(tmp_path)["stages"]}
    assert values == (rows["evaluate"]["val_loss"], rows["train"]["latency_ms"])
    assert rows["evaluate"]["val_loss"] != rows["evaluate"]["loss"]  # validation, not test
    single = run(compose(TINY), tmp_path / "single", "baseline")
    assert single == read_summary(tmp_path / "single")["stages"][-1]["metrics"]["val_accuracy"]


def test_a_run_validates_and_builds_its_model_once(workdir: Path) -> None:
    probe = """
import sys
import effitrain.pipeline as pipeline
calls = {"validate": 0, "build_model": 0}
def counted(name, function):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)
    return wrapper
pipeline.validate = counted("validate", pipeline.validate)
pipeline.build_model = counted("build_model", pipeline.build_model)
from effitrain.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    assert done.code in (0, None), done.code
print("CALLS", calls["validate"], calls["build_model"])
"""
    result = subprocess.run([sys.executable, "-c", probe, "run", *TINY], cwd=workdir, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "CALLS 1 1"


def test_bad_teacher_files_stop_before_any_stage_trains(workdir: Path) -> None:
    junk = workdir / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    result = run_cli("run", "recipe=distill_digits", "data=synthetic", f"stage.student.teachers=[{junk}]", cwd=workdir)
    assert_refused(result, f"stage.student.teachers[0] = '{junk}': not a readable safetensors file", workdir)
    folder = workdir / "somefolder"
    folder.mkdir()
    result = run_cli("run", "recipe=distill_digits", "data=synthetic", f"stage.student.teachers=[{folder}]", cwd=workdir)
    assert_refused(result, f"stage.student.teachers[0]: {folder}: not an effitrain run folder", workdir)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("damage", ["summary", "checkpoint", "model"])
def test_resume_of_a_damaged_run_names_the_file_and_touches_nothing(workdir: Path, damage: str) -> None:
    assert run_cli("run", *TINY, "hydra.run.dir=run", cwd=workdir).returncode == 0
    run = workdir / "run"
    summary = read_summary(run)
    summary["status"] = "failed"
    summary["stages"] = summary["stages"][:1]  # as if killed during the evaluate stage
    (run / "summary.json").write_text(json.dumps(summary))
    target = {"summary": run / "summary.json", "checkpoint": run / "checkpoints" / "train" / "last_state.pt",
              "model": run / "checkpoints" / "00_train.safetensors"}[damage]
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 3])  # truncated
    before = _snapshot(run)
    result = run_cli("resume", "run", cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert str(target) in result.stderr or target.name in result.stderr
    assert _snapshot(run) == before


def test_algorithms_do_not_import_the_pipeline_or_stages() -> None:
    forbidden = ("effitrain.pipeline", "effitrain.stages", "effitrain.runs")
    for folder in ("distill", "prune", "quant", "compress", "data", "models"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [alias.name for alias in getattr(node, "names", [])] if isinstance(node, ast.Import) else []
                assert not any(name.startswith(forbidden) for name in names), f"{path.name} imports {names}"


BAD_SEAMS = [
    ("task._target_=nope.Task", "task._target_ = 'nope.Task': cannot import it"),
    ("task._target_=torch.nn.ReLU", "task._target_ = 'torch.nn.ReLU' is not an effitrain Task"),
    ("objective.0.metric=val_f1", "objective[0].metric = 'val_f1' is not allowed (allowed: val_loss, val_accuracy, latency_ms, size_bytes"),
    ("objective.0.stage=nope", "objective[0].stage = 'nope' is not allowed (allowed: train, evaluate)"),
    ("stage.train.trainer.monitor=val_f1", "stage.train.trainer.monitor = 'val_f1' is not allowed (allowed: val_loss, val_accuracy)"),
]


@pytest.fixture(scope="module")
def bad_seams(tmp_path_factory) -> dict:
    """Every case of BAD_SEAMS through the CLI, in one process (see conftest.run_cli_batch)."""
    cases = [["run", *TINY, override] for override, _ in BAD_SEAMS]
    return dict(zip((override for override, _ in BAD_SEAMS), run_cli_batch(cases, tmp_path_factory.mktemp("refused"))))


@pytest.mark.parametrize("override,message", BAD_SEAMS, ids=[case[0] for case in BAD_SEAMS])
def test_bad_seam_input_is_one_line_and_no_run_folder(bad_seams: dict, override: str, message: str) -> None:
    folder, result = bad_seams[override]
    assert_refused(result, message, folder)


def test_optuna_searches_the_validation_objective_in_its_direction(workdir: Path) -> None:
    """Hydra's Optuna sweeper plugin samples an interval the pre-check cannot enumerate; the jobs
    return validation accuracy, which it maximises because the objective says so."""
    result = run_cli("run", "-m", *TINY, "trainer.max_epochs=1", "hydra/sweeper=search", "hydra.sweeper.n_trials=3", "optimizer.lr=interval(0.00005,0.002)",
                     "hydra.sweeper.sampler.seed=0", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((workdir / "multirun").glob("*/*/*/summary.json"))
    assert len(jobs) == 3
    values = [json.loads(job.read_text())["objective"]["val_accuracy"] for job in jobs]
    results = next((workdir / "multirun").glob("*/*/optimization_results.yaml")).read_text()
    assert "Directions: ['maximize']" in result.stdout + result.stderr
    assert min(values) < max(values)  # the trials differ, so the best one tells the direction apart
    assert f"best_value: {max(values)}" in results


def test_a_bad_interval_end_is_caught_before_the_sweep(workdir: Path) -> None:
    result = run_cli("run", "-m", *TINY, "hydra/sweeper=search", "hydra.sweeper.n_trials=3", "optimizer.lr=interval(-1,0.02)", cwd=workdir)
    assert result.returncode == 2 and result.stderr.strip() == "error: optimizer.lr = -1.0 is not allowed (allowed: a number > 0)"
    assert not (workdir / "multirun").exists()


def test_a_persisted_study_continues_where_it_stopped(workdir: Path) -> None:
    import optuna

    command = ["run", "-m", *TINY, "trainer.max_epochs=1", "hydra/sweeper=search", "hydra.sweeper.n_trials=1",
               "optimizer.lr=interval(0.0001,0.01)", "hydra.sweeper.study_name=s", "hydra.sweeper.storage=sqlite:///study.db"]
    for _ in range(2):
        result = run_cli(*command, cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{workdir / 'study.db'}").trials) == 2


def test_the_compress_search_recipe_runs_its_trials_and_reports_a_front(workdir: Path) -> None:
    result = run_cli("run", "-m", "recipe=compress_search", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0", "data=synthetic",
                     "trainer.max_epochs=1", "stage.student.trainer.max_epochs=1", "stage.prune.trainer.max_epochs=1",
                     "measure.repeats=10", "measure.warmup=1", "hydra.sweep.dir=search", cwd=workdir, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((workdir / "search").glob("*/summary.json"))
    assert len(jobs) == 3
    objectives = [json.loads(job.read_text())["objective"] for job in jobs]
    assert all(set(item) == {"val_accuracy", "size_bytes"} for item in objectives)
    assert "Directions: ['maximize', 'minimize']" in result.stdout + result.stderr
    assert "Number of Pareto solutions" in result.stdout + result.stderr
