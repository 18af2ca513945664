"""`effitrain compare` on a real tiny sweep: seed groups, churn, formats, sorting, bad input."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from effitrain.predictions import churn

from conftest import TINY, assert_refused, run_cli


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """baseline on synthetic data: learning rates 0.003 and 0.03, seeds 1 and 2 (4 runs)."""
    root = tmp_path_factory.mktemp("sweep")
    result = run_cli("run", "-m", *TINY, "trainer.max_epochs=1", "optimizer.lr=0.003,0.03", "seed=1,2", "hydra.sweep.dir=sw", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_seeds_are_grouped_with_mean_std_and_churn(sweep: Path) -> None:
    result = run_cli("compare", "sw", "--stage", "train", "--format", "json", cwd=sweep)
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert [(record["optimizer.lr"], record["seeds"]) for record in records] == [("0.003", 2), ("0.03", 2)]
    jobs = sorted((path for path in (sweep / "sw").iterdir() if path.is_dir()), key=lambda path: int(path.name))
    summaries = {job: json.loads((job / "summary.json").read_text()) for job in jobs}
    members = [job for job in jobs if (job / ".hydra" / "overrides.yaml").read_text().count("optimizer.lr=0.003")]
    accuracies = [summaries[job]["stages"][0]["metrics"]["val_accuracy"] for job in members]
    assert records[0]["val_accuracy"] == pytest.approx(sum(accuracies) / 2)
    predictions = [json.loads((job / "predictions" / "train.json").read_text())["predictions"] for job in members]
    assert records[0]["churn"] == pytest.approx(churn(*predictions))


def test_table_markdown_csv_and_sort(sweep: Path) -> None:
    table = run_cli("compare", "sw", cwd=sweep)
    assert table.returncode == 0 and "(+1 seeds)" in table.stdout and "±" in table.stdout and "…" not in table.stdout
    markdown = run_cli("compare", "sw", "--stage", "evaluate", "--format", "markdown", cwd=sweep).stdout.splitlines()
    assert markdown[0].startswith("| run | optimizer.lr | stage | status | seeds | churn | val_accuracy") and len(markdown) == 4
    rows = list(csv.DictReader(io.StringIO(run_cli("compare", "sw", "--stage", "train", "--format", "csv", "--sort", "val_loss", cwd=sweep).stdout)))
    losses = [float(row["val_loss"]) for row in rows]
    assert losses == sorted(losses) and {"val_loss_std", "churn", "latency_ms"} <= set(rows[0])


def test_a_failed_run_is_listed_with_its_status(sweep: Path, tmp_path: Path) -> None:
    shutil.copytree(sweep / "sw" / "0", tmp_path / "a")
    shutil.copytree(sweep / "sw" / "2", tmp_path / "b")  # another learning rate: not a seed of "a"
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    summary.update(status="failed", error="boom", stages=summary["stages"][:1])
    (tmp_path / "b" / "summary.json").write_text(json.dumps(summary))
    records = json.loads(run_cli("compare", "a", "b", "--format", "json", cwd=tmp_path).stdout)
    assert [(record["run"], record["stage"], record["status"]) for record in records] == [
        ("a", "train", "completed"), ("a", "evaluate", "completed"), ("b", "train", "failed")]


def test_bad_compare_input_is_one_line(sweep: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    shutil.copytree(sweep / "sw" / "0", tmp_path / "broken")
    (tmp_path / "broken" / "summary.json").write_text('{"stages": [')
    cases = [
        (["nowhere"], "nowhere: no such folder (allowed: run folders and sweep folders)"),
        (["empty"], "empty: not a run folder and no run folders below it"),
        (["broken"], "summary.json: not a readable ledger (JSONDecodeError"),
        ([str(sweep / "sw"), "--stage", "int8"], "--stage 'int8': no run has that stage (allowed: evaluate, train)"),
        ([str(sweep / "sw"), "--sort", "speed"], "--sort = 'speed' is not allowed (allowed: val_accuracy, accuracy, params"),
        ([str(sweep / "sw"), "--format", "xml"], "--format = 'xml' is not allowed (allowed: table, csv, json, markdown)"),
    ]
    for arguments, message in cases:
        assert_refused(run_cli("compare", *arguments, cwd=tmp_path), message, tmp_path)
