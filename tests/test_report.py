"""`effitrain report` and the schedules runs log: Pareto sets, the HTML page on a real tiny
sweep, the planned schedule against what a run logged, a missed sparsity target, bad input."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from effitrain.report import pareto_front

from conftest import assert_refused, run_cli

PRUNE = ["recipe=prune_gradual_digits", "model.channels=[4,8]", "model.hidden=16", "trainer.max_epochs=1",
         "stage.pruned.trainer.max_epochs=3", "stage.pruned.sparsity=0.8", "stage.pruned.frequency=2",
         "measure.repeats=10", "measure.warmup=1"]


def test_pareto_front_of_hand_made_points() -> None:
    # (cost, accuracy): (2, 0.9) dominates (3, 0.85); (1, 0.7) and (4, 0.95) trade off; (2, 0.9) twice stays twice
    points = [(3.0, 0.85), (1.0, 0.7), (2.0, 0.9), (4.0, 0.95), (2.0, 0.9), (5.0, 0.95), (1.5, 0.6)]
    assert pareto_front(points) == [1, 2, 4, 3]
    # minimising the y value (e.g. a loss) keeps the cheap, low points instead
    assert pareto_front(points, maximize_y=False) == [1, 6]
    assert pareto_front([(1.0, 0.5), (1.0, 0.4)], maximize_y=False) == [1]
    assert pareto_front([]) == []


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Gradual pruning on synthetic data, two seeds, the default end and an end the stage never
    reaches (4 runs, each writing its own report.html)."""
    root = tmp_path_factory.mktemp("reportsweep")
    result = run_cli("run", "-m", *PRUNE, "stage.pruned.end_step=null,100000", "seed=0,1", "hydra.sweep.dir=sw", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def _jobs(sweep: Path) -> list[Path]:
    return sorted((path for path in (sweep / "sw").iterdir() if path.is_dir()), key=lambda path: int(path.name))


def test_the_page_names_every_run_and_links_pngs_that_exist(sweep: Path) -> None:
    result = run_cli("report", "sw", "-o", "out", cwd=sweep)
    assert result.returncode == 0, result.stderr
    page = (sweep / "out" / "index.html").read_text()
    for job in _jobs(sweep):
        assert f"<td>{job.name}</td>" in page
    links = set(re.findall(r"src='([^']+)'", page))
    assert {"pareto_latency_ms.png", "pareto_size_bytes.png", "pareto_params.png", "seeds_1.png", "seeds_2.png"} <= links
    assert {f"{kind}_{job.name}.png" for job in _jobs(sweep) for kind in ("curves", "sparsity", "schedule")} <= links
    for link in links:
        assert (sweep / "out" / link).stat().st_size > 1000, link
    assert "Sparsity targets missed" in page and "achieved sparsity" in page
    one_stage = run_cli("report", "sw", "-o", "pruned_only", "--stage", "pruned", cwd=sweep)
    assert one_stage.returncode == 0, one_stage.stderr
    assert "<td>dense</td>" not in (sweep / "pruned_only" / "index.html").read_text()


def test_every_run_folder_has_its_own_report(sweep: Path) -> None:
    for job in _jobs(sweep):
        page = (job / "report.html").read_text()
        for link in re.findall(r"src='([^']+)'", page):
            assert link.startswith("artifacts/plots/") and (job / link).stat().st_size > 1000


def test_logged_schedule_is_the_planned_one_and_targets_are_checked(sweep: Path) -> None:
    from effitrain.config.compose import compose
    from effitrain.pipeline import planned_schedule

    reached, missed = _jobs(sweep)[0], _jobs(sweep)[2]
    for job, end in ((reached, "null"), (missed, "100000")):
        fits = {fit.name: fit for _, _, fit in planned_schedule(compose([*PRUNE, f"stage.pruned.end_step={end}", "seed=0"]))}
        logged = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        steps = [record for record in logged if record["stage"] == "pruned" and "epoch" not in record]
        assert steps and all(record["lr"] == pytest.approx(fits["pruned"].lr[record["step"] - 1]) for record in steps)
        assert all(record["target_sparsity"] == pytest.approx(fits["pruned"].values["target_sparsity"][record["step"] - 1]) for record in steps)
        assert all(abs(record["achieved_sparsity"] - record["target_sparsity"]) < 0.01 for record in steps)
        row = json.loads((job / "summary.json").read_text())["stages"][-1]["metrics"]
        assert row["target_sparsity"] == 0.8
    reached_row = json.loads((reached / "summary.json").read_text())["stages"][-1]["metrics"]
    missed_row = json.loads((missed / "summary.json").read_text())["stages"][-1]["metrics"]
    assert reached_row["achieved_sparsity"] == pytest.approx(0.8, abs=0.005)
    assert missed_row["achieved_sparsity"] < 0.1
    assert f"achieved sparsity {missed_row['achieved_sparsity']:.3f} < target 0.800" in (missed / "run.log").read_text()
    assert "achieved sparsity" not in (reached / "run.log").read_text().split("prune_gradual_digits on")[-1]


def test_show_schedule_prints_and_draws_the_plan(tmp_path: Path) -> None:
    result = run_cli("show", *PRUNE, "--schedule", "-o", "plan.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "[2/2 pruned] prune:" in result.stdout and "target sparsity" in result.stdout and "0.8000" in result.stdout
    assert (tmp_path / "plan.png").stat().st_size > 1000
    again = run_cli("show", *PRUNE, "--schedule", "-o", "plan.png", cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert run_cli("show", *PRUNE, "--schedule", "-o", "plan.csv", cwd=tmp_path).returncode == 0
    rows = list(csv.DictReader((tmp_path / "plan.csv").open()))
    pruned = [row for row in rows if row["stage"] == "pruned"]
    assert [int(row["step"]) for row in pruned] == list(range(1, len(pruned) + 1)) and float(pruned[-1]["target_sparsity"]) == 0.8


def test_bad_report_input_is_one_line(sweep: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    shutil.copytree(_jobs(sweep)[0], tmp_path / "broken")
    (tmp_path / "broken" / "summary.json").write_text('{"stages": [')
    sw = str(sweep / "sw")
    cases = [
        (["nowhere", "-o", "o1"], "nowhere: no such folder (allowed: run folders and sweep folders)"),
        (["empty", "-o", "o2"], "empty: not a run folder and no run folders below it"),
        (["broken", "-o", "o3"], "summary.json: not a readable ledger (JSONDecodeError"),
        ([sw, "-o", "full"], "-o full: already holds files; a report is never written over files"),
        ([sw, "-o", "o4", "--metric", "speed"], "--metric 'speed': no run reports it (allowed: val_accuracy, accuracy"),
        ([sw, "-o", "o5", "--stage", "int8"], "--stage 'int8': no run has that stage (allowed: dense, pruned)"),
    ]
    for arguments, message in cases:
        assert_refused(run_cli("report", *arguments, cwd=tmp_path), message, tmp_path)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and sorted(path.name for path in (tmp_path / "full").iterdir()) == ["keep.txt"]
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3", "o4", "o5"))
