"""End-to-end: the real `effitrain` command in a subprocess, on tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from effitrain.config import recipe_files

from conftest import run_cli_batch, assert_refused, TINY, read_summary, run_and_kill, run_cli, run_dirs


def test_run_writes_the_run_folder_contract(workdir: Path) -> None:
    result = run_cli("run", *TINY, cwd=workdir)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(workdir)
    assert run_dir.name.endswith("_baseline")
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "run.log", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").iterdir())
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    assert summary["recipe"] == "baseline"
    assert summary["device"] == "cpu"
    assert summary["precision"]["requested"] == "auto" and summary["precision"]["used"] == "fp32"
    assert "CPU" in summary["precision"]["why"]
    assert [row["name"] for row in summary["stages"]] == ["train", "evaluate"]
    metrics = summary["stages"][0]["metrics"]
    assert metrics["accuracy"] > 0.5  # 4 well-separated blobs: far above chance (0.25)
    assert metrics["params"] == metrics["nonzero_params"] == (64 * 16 + 16) + (16 * 4 + 4)
    saved = run_dir / "checkpoints" / "00_train.safetensors"
    assert metrics["size_bytes"] == saved.stat().st_size
    assert metrics["latency_ms"] > 0 and metrics["seconds"] > 0
    assert metrics["epochs"] == 2
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {line["epoch"] for line in lines if "epoch" in line} == {1, 2}
    log_text = (run_dir / "run.log").read_text()
    assert "precision fp32" in log_text and "completed" in log_text  # the ledger table is in the log


def test_two_runs_in_the_same_second_get_two_folders(workdir: Path) -> None:
    processes = [
        subprocess.Popen([sys.executable, "-m", "effitrain.cli", "run", *TINY, "trainer.max_epochs=1"], cwd=workdir,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]
    assert [process.wait(timeout=240) for process in processes] == [0, 0]
    folders = run_dirs(workdir)
    assert len(folders) == 2
    assert all(read_summary(folder)["status"] == "completed" for folder in folders)


def test_multirun_sweep_with_flag_after_overrides(workdir: Path) -> None:
    result = run_cli("run", *TINY, "trainer.max_epochs=1", "-m", "seed=1,2", cwd=workdir)
    assert result.returncode == 0, result.stderr
    (sweep,) = (workdir / "multirun").glob("*/*")
    jobs = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert [job.name for job in jobs] == ["0", "1"]
    assert [read_summary(job)["seed"] for job in jobs] == [1, 2]


def test_hydra_joblib_launcher_runs_the_sweep_in_one_folder(workdir: Path) -> None:
    """Hydra's own joblib launcher, as a new user would pick it: its workers resolve the run
    config in other processes (no Hydra config there yet) and must land in the launcher's folder;
    each job is itself a run of 2 processes (started from inside joblib's worker)."""
    result = run_cli("run", *TINY, "trainer.max_epochs=1", "-m", "seed=1,2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     "trainer.devices=2", cwd=workdir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (workdir / "multirun").glob("*/*")
    jobs = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert [job.name for job in jobs] == ["0", "1"]
    assert sorted(read_summary(job)["seed"] for job in jobs) == [1, 2]
    assert all(read_summary(job)["status"] == "completed" and read_summary(job)["processes"] == 2 for job in jobs)


def test_show_composes_without_running_or_importing_torch(workdir: Path) -> None:
    result = run_cli("show", "recipe=baseline", "precision=bf16", "optimizer.lr=0.01", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "policy: bf16" in result.stdout and "lr: 0.01" in result.stdout
    assert "num_classes: 10" in result.stdout  # interpolations resolved
    assert not (workdir / "outputs").exists()
    probe = (
        "import sys\nfrom effitrain.cli import main\ntry:\n    main(['show', 'recipe=baseline'])\nexcept SystemExit as done:\n"
        "    assert done.code in (0, None), done.code\nassert 'torch' not in sys.modules, 'torch imported'\nprint('reached')"
    )
    probed = subprocess.run([sys.executable, "-c", probe], cwd=workdir, capture_output=True, text=True)
    assert probed.returncode == 0 and probed.stdout.strip().endswith("reached"), probed.stderr[-2000:]


def test_ls_lists_recipes_and_groups(workdir: Path) -> None:
    result = run_cli("ls", cwd=workdir)
    assert result.returncode == 0
    for word in ("baseline", "quickstart", "precision", "fp16", "synthetic", "Digits CNN"):
        assert word in result.stdout


def test_help_does_not_import_torch(workdir: Path) -> None:
    probe = (
        "import sys\nfrom effitrain.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", probe], cwd=workdir, capture_output=True).returncode == 0


BAD_INPUTS = [
    ("optimizer.lr=-1", "optimizer.lr = -1 is not allowed (allowed: a number > 0)"),
    ("trainer.max_epochs=0", "trainer.max_epochs = 0 is not allowed (allowed: an integer >= 1)"),
    ("trainer.max_epochs=abc", "trainer.max_epochs: Value 'abc' of type 'str' could not be converted to Integer"),
    ("trainer.foo=1", "trainer.foo: no such key here (to add a new key on purpose: +trainer.foo=1)"),
    ("model=nope", "model=nope: no such option in group 'model' (allowed: bert, cnn, mlp, torchvision)"),
    ("recipe=nope", f"recipe=nope: no such option in group 'recipe' (allowed: {', '.join(sorted(recipe_files()))})"),
    ("precision=fp16", "precision=fp16 needs a CUDA device, this run is on cpu"),
    ("precision=fp8", "precision=fp8: no such option in group 'precision' (allowed: auto, bf16, fp16, fp32)"),
    ("stage.train.trainer.max_epochs=0", "stage.train.trainer.max_epochs = 0 is not allowed"),
    ("data.val_fraction=1.5", "data.val_fraction = 1.5 is not allowed (allowed: a number in (0, 1))"),
    ("scheduler=step", "scheduler=step: no such option in group 'scheduler' (allowed: constant, cosine, linear)"),
    ("scheduler.min_lr_ratio=2", "scheduler.min_lr_ratio = 2 is not allowed (allowed: a number in [0, 1])"),
    ("+optimizer.bogus=1", "optimizer: got an unexpected keyword argument 'bogus' (allowed keys: params, lr"),
    ("trainer.monitor=val_f1", "trainer.monitor = 'val_f1' is not allowed (allowed: val_loss, val_accuracy)"),
    ("objective.0.metric=accuracy", "objective[0].metric = 'accuracy' is a test-split figure, for reporting only; sweeps tune on validation"),
    ("objective.0.direction=up", "objective[0].direction = 'up' is not allowed (allowed: maximize, minimize)"),
    ("stage.train._target_=nope.Nope", "stage.train._target_ = 'nope.Nope': no such stage class"),
    ("+model.bogus=3", "unexpected keyword argument 'bogus'"),
    ("device=cuda:7", "device = 'cuda:7'"),
    ("measure.repeats=3", "measure.repeats = 3 is not allowed"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> dict:
    """Every case of BAD_INPUTS through the CLI, in one process (see conftest.run_cli_batch)."""
    cases = [["run", *TINY, override] for override, _ in BAD_INPUTS]
    return dict(zip((override for override, _ in BAD_INPUTS), run_cli_batch(cases, tmp_path_factory.mktemp("refused"))))


@pytest.mark.parametrize("override,message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_no_run_folder(bad_inputs: dict, override: str, message: str) -> None:
    folder, result = bad_inputs[override]
    assert_refused(result, message, folder)


def test_bad_sweep_value_is_caught_before_any_job(workdir: Path) -> None:
    result = run_cli("run", "-m", *TINY, "optimizer.lr=0.01,-1", cwd=workdir)
    assert result.returncode == 2 and "optimizer.lr = -1" in result.stderr
    assert not (workdir / "multirun").exists()


def test_existing_run_dir_is_never_overwritten(workdir: Path) -> None:
    target = workdir / "mine"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    result = run_cli("run", *TINY, f"hydra.run.dir={target}", cwd=workdir)
    assert result.returncode == 2 and "already holds files" in result.stderr
    assert sorted(path.name for path in target.iterdir()) == ["keep.txt"]


def test_missing_dataset_is_refused_before_any_run_folder(workdir: Path) -> None:
    result = run_cli("run", "recipe=baseline", "data=mnist", "data.root=nowhere/mnist", "measure.repeats=10", cwd=workdir)
    assert_refused(result, "data.root = 'nowhere/mnist': no such folder (allowed: a folder holding the data; or data.download=true, which needs a network)", workdir)
    result = run_cli("run", "recipe=baseline", "data=text", "model=bert", "data.path=nowhere.csv", "data.num_classes=2", cwd=workdir)
    assert_refused(result, "data.path = 'nowhere.csv': no such file (allowed: an existing .csv or .jsonl file)", workdir)
    result = run_cli("run", "recipe=baseline", "data=text", "data.path=nowhere.csv", "data.num_classes=2", cwd=workdir)
    assert_refused(result, "data.tokenizer = '${model.pretrained}': Interpolation key 'model.pretrained' not found", workdir)


def test_a_dataset_folder_without_the_files_fails_with_path_and_failed_status(workdir: Path) -> None:
    (workdir / "empty_mnist").mkdir()
    result = run_cli("run", "recipe=baseline", "data=mnist", "data.root=empty_mnist", "measure.repeats=10", cwd=workdir)
    assert result.returncode == 2
    assert "MNIST not found under 'empty_mnist'" in result.stderr and "Traceback" not in result.stderr
    (run_dir,) = run_dirs(workdir)
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and "MNIST not found" in summary["error"]


def test_resume_after_kill_matches_uninterrupted_run(workdir: Path) -> None:
    settings = [*TINY, "trainer.max_epochs=12", "data.num_samples=2000", "model.hidden=[64]", "measure.final_retime=false"]
    assert run_cli("run", *settings, "hydra.run.dir=full", cwd=workdir).returncode == 0
    run_and_kill(["run", *settings, "hydra.run.dir=killed"], workdir, workdir / "killed" / "checkpoints" / "train" / "last_state.pt")
    assert read_summary(workdir / "killed")["status"] == "running"  # killed mid-training, not finished
    result = run_cli("resume", str(workdir / "killed"), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "resumed after epoch" in result.stdout
    full, resumed = read_summary(workdir / "full"), read_summary(workdir / "killed")
    assert resumed["status"] == "completed"
    for a, b in zip(full["stages"], resumed["stages"]):
        assert a["metrics"]["accuracy"] == b["metrics"]["accuracy"]
        assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-6)
    again = run_cli("resume", str(workdir / "killed"), cwd=workdir)
    assert again.returncode == 2 and "already completed" in again.stderr
