"""Distillation recipes through the real CLI on tiny settings, and their bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli_batch, assert_refused, read_summary, run_cli, run_dirs

TINY_DIGITS = ["data=synthetic", "trainer.max_epochs=2", "measure.repeats=10", "measure.warmup=1"]


def test_distill_digits_has_teacher_control_and_student_rows(workdir: Path) -> None:
    result = run_cli("run", "recipe=distill_digits", *TINY_DIGITS, "stage.no_kd.trainer.max_epochs=2",
                     "stage.student.trainer.max_epochs=2", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(workdir)
    rows = {row["name"]: row["metrics"] for row in read_summary(run_dir)["stages"]}
    assert list(rows) == ["teacher", "no_kd", "student", "evaluate"]
    assert rows["student"]["params"] == rows["no_kd"]["params"] < rows["teacher"]["params"] / 5
    assert rows["student"]["teacher_accuracy"] == [pytest.approx(rows["teacher"]["accuracy"])]
    assert {p.name for p in (run_dir / "predictions").iterdir()} == {f"{name}.json" for name in rows}
    assert "no_kd" in result.stdout + result.stderr  # the ledger table is printed
    # the distilled student of that run teaches in another run (rebuilt from the run folder)
    result = run_cli("run", "recipe=distill_digits", *TINY_DIGITS, "stage.no_kd.trainer.max_epochs=1", "stage.student.trainer.max_epochs=1",
                     f"stage.student.teachers=[{run_dir}:student]", "hydra.run.dir=second", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    second = {row["name"]: row["metrics"] for row in read_summary(workdir / "second")["stages"]}
    assert second["student"]["teacher_accuracy"] == [pytest.approx(rows["student"]["accuracy"])]


def test_codistill_reports_churn_and_runs_compare(workdir: Path) -> None:
    for seed in (1, 2):
        result = run_cli("run", "recipe=codistill_digits", *TINY_DIGITS, f"seed={seed}", "stage.codistill.burn_in_steps=2",
                         f"hydra.run.dir=run{seed}", cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row["metrics"] for row in read_summary(workdir / "run1")["stages"]}
    for name in ("independent", "codistill"):
        assert len(rows[name]["peer_accuracy"]) == 2 and 0 <= rows[name]["churn"] <= 1
        assert rows[name]["accuracy"] == pytest.approx(rows[name]["peer_accuracy"][0])
    assert (workdir / "run1" / "predictions" / "codistill_peer1.json").is_file()
    result = run_cli("churn", "run1", "run2", "--stage", "codistill", cwd=workdir)
    assert result.returncode == 0 and result.stdout.startswith("churn "), result.stderr
    result = run_cli("churn", "run1", "nowhere", cwd=workdir)
    assert result.returncode == 2 and result.stderr.strip() == "error: nowhere: not an effitrain run folder (no summary.json or .hydra/config.yaml)"


BAD = [
    ("stage.student.temperature=0", "stage.student.temperature = 0.0 is not allowed (allowed: a number > 0)"),
    ("stage.student.alpha=2", "stage.student.alpha = 2.0 is not allowed (allowed: a number in [0, 1])"),
    ("stage.student.teachers=[nope]", "stage.student.teachers[0] = 'nope': no such teacher (allowed: teacher, no_kd, pretrained"),
    ("stage.student.keep_every=2", "stage.student.student / keep_every: give exactly one"),
    ("stage.student.features=[{student: x}]", "stage.student.features[0] = {'student': 'x'} is not allowed"),
]


@pytest.fixture(scope="module")
def bad_distill(tmp_path_factory) -> dict:
    """Every case of BAD through the CLI, in one process (see conftest.run_cli_batch)."""
    cases = [["run", "recipe=distill_digits", *TINY_DIGITS, override] for override, _ in BAD]
    return dict(zip((override for override, _ in BAD), run_cli_batch(cases, tmp_path_factory.mktemp("refused"))))


@pytest.mark.parametrize("override,message", BAD, ids=[case[0] for case in BAD])
def test_bad_distill_input_is_one_line_and_no_run_folder(bad_distill: dict, override: str, message: str) -> None:
    folder, result = bad_distill[override]
    assert_refused(result, message, folder)


def test_unknown_feature_layer_stops_before_training_with_valid_names(workdir: Path) -> None:
    result = run_cli("run", "recipe=distill_digits", *TINY_DIGITS, "stage.no_kd.trainer.max_epochs=1",
                     "stage.student.cache_teacher=false", "stage.student.features=[{student: features.9, teacher: features.2}]",
                     cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "student layer 'features.9' does not exist in SmallCNN (valid names: features, features.0," in result.stderr
    (run_dir,) = run_dirs(workdir)
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and [row["name"] for row in summary["stages"]] == ["teacher", "no_kd"]
    assert not (run_dir / "checkpoints" / "student").exists()  # nothing trained
