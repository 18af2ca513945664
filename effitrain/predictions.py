"""Test-set predictions saved in the run folder (predictions/<stage>.json), and prediction
churn: the fraction of examples whose predicted label differs between two models (Anil et
al. 2018), e.g. two peers, or the same stage of two runs of a seed sweep."""

from __future__ import annotations

import json
from pathlib import Path

from effitrain.runfiles import read_summary, write_json
from effitrain.errors import ConfigError


def churn(first: list[int], second: list[int]) -> float:
    """Fraction of examples whose predicted labels differ between two prediction lists."""
    if len(first) != len(second) or not first:
        raise ValueError(f"cannot compare {len(first)} with {len(second)} predictions")
    return sum(a != b for a, b in zip(first, second)) / len(first)


def write_predictions(path: Path, labels: list[int], predictions: list[int]) -> None:
    """Save test labels and predicted labels (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"labels": labels, "predictions": predictions})


def read_predictions(path: Path) -> dict[str, list[int]]:
    return json.loads(path.read_text())


def run_predictions(run_dir: Path, stage: str | None) -> tuple[str, dict[str, list[int]]]:
    """The saved predictions of `stage` (default: the last stage in summary.json) of a run folder.

    Raises:
        ConfigError: not a run folder, or no predictions for that stage (names the ones there are).
    """
    folder = run_dir / "predictions"
    stages = [row["name"] for row in read_summary(run_dir)["stages"]]  # also: is it a run folder at all
    if stage is None:
        if not stages:
            raise ConfigError(f"{run_dir}: the run has no completed stage")
        stage = stages[-1]
    path = folder / f"{stage}.json"
    if not path.is_file():
        there = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        raise ConfigError(f"{run_dir}: no predictions for stage {stage!r} (allowed: {', '.join(there) or 'none saved'})")
    return stage, read_predictions(path)


def compare_runs(first: Path, second: Path, stage: str | None = None) -> dict[str, float | str]:
    """Churn between the test predictions of one stage in two run folders.

    Raises:
        ConfigError: the runs were tested on different examples (different data or split).
    """
    first_stage, a = run_predictions(first, stage)
    second_stage, b = run_predictions(second, stage)
    if a["labels"] != b["labels"]:
        raise ConfigError(f"{first} and {second} were tested on different examples (data or split differ); churn needs the same test set")
    accuracy = lambda p: sum(x == y for x, y in zip(p["predictions"], p["labels"])) / len(p["labels"])  # noqa: E731
    return {"stage_a": first_stage, "stage_b": second_stage, "accuracy_a": accuracy(a), "accuracy_b": accuracy(b),
            "churn": churn(a["predictions"], b["predictions"]), "examples": len(a["labels"])}
