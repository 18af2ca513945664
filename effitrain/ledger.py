"""The run's ledger: summary.json (rewritten after every stage) and the table shown at the end."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from effitrain.runfiles import write_json


class Ledger:
    """summary.json of one run: recipe, status, device, precision and one row per stage.

    Args:
        path: the summary.json file.
        header: recipe, device and precision ({"requested", "used", "why"}).
    """

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**header, "status": "running", "stages": []}

    @classmethod
    def resume(cls, path: Path, header: dict[str, Any]) -> "Ledger":
        """Reopen an interrupted run's ledger, keeping its completed rows."""
        ledger = cls(path, header)
        if path.exists():
            ledger.data["stages"] = json.loads(path.read_text()).get("stages", [])
        ledger.write()
        return ledger

    @property
    def completed(self) -> set[str]:
        return {row["name"] for row in self.data["stages"]}

    def add(self, name: str, kind: str, metrics: dict[str, Any]) -> None:
        """Append a stage's row and rewrite summary.json, so a crash leaves an honest partial record."""
        self.data["stages"].append({"name": name, "kind": kind, "metrics": metrics})
        self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        """Set the final status (completed or failed), with the error line if failed."""
        self.data["status"] = status
        if error is not None:
            self.data["error"] = error
        self.write()

    def write(self) -> None:
        write_json(self.path, self.data)


SPARSITY_TOLERANCE = 0.005  # a prune stage's |achieved - target| beyond this is noted in the ledger and the report


def sparsity_gap(metrics: dict[str, Any]) -> str:
    """'achieved sparsity 0.850 < target 0.900' when a prune stage missed its target, else ''."""
    target, achieved = metrics.get("target_sparsity"), metrics.get("achieved_sparsity")
    if target is None or achieved is None or abs(achieved - target) <= SPARSITY_TOLERANCE:
        return ""
    return f"achieved sparsity {achieved:.3f} {'<' if achieved < target else '>'} target {target:.3f}"


def _kilobytes(value: int) -> str:
    return f"{value / 1024:,.1f}"


COLUMNS = [  # (header, metrics key, format); the task's headline metric comes first
    ("params", "params", lambda v: f"{v:,}"),
    ("nonzero", "nonzero_params", lambda v: f"{v:,}"),
    ("sparsity", "sparsity", lambda v: f"{v:.3f}"),
    ("size KiB", "size_bytes", _kilobytes),
    ("latency ms", "latency_ms", lambda v: f"{v:.3f}"),
    ("seconds", "seconds", lambda v: f"{v:.1f}"),
]


def ledger_table(summary: dict[str, Any]) -> Any:
    """A Rich table of the ledger: the task's headline metric (test split), costs, and size and
    speed relative to the first row."""
    from rich.table import Table

    headline = summary.get("headline", "accuracy")
    columns = [(headline, headline, lambda v: f"{v:.4f}"), *COLUMNS]
    precision = summary["precision"]
    runtime = next((row["metrics"]["latency_runtime"] for row in summary["stages"] if row["metrics"].get("latency_runtime")), None)
    timed = f", latency in {runtime}" if runtime else ""
    table = Table(title=f"{summary['recipe']} on {summary['device']} ({precision['used']}{timed}) — {summary['status']}")
    # numbers are never cut with an ellipsis: a narrow table wraps the notes first, then folds cells
    table.add_column("stage", overflow="fold")
    table.add_column("kind", overflow="fold")
    for header, _, _ in columns:
        table.add_column(header, justify="right", overflow="fold")
    table.add_column("smaller x", justify="right", overflow="fold")
    table.add_column("faster x", justify="right", overflow="fold")
    table.add_column("notes", overflow="fold", ratio=1)
    rows = summary["stages"]
    first = rows[0]["metrics"] if rows else {}
    for row in rows:
        metrics = row["metrics"]
        cells = [fmt(metrics[key]) if metrics.get(key) is not None else "-" for _, key, fmt in columns]
        smaller = first.get("size_bytes", 0) / metrics["size_bytes"] if metrics.get("size_bytes") else None
        faster = first.get("latency_ms", 0) / metrics["latency_ms"] if metrics.get("latency_ms") else None
        cells += [f"{smaller:.2f}" if smaller else "-", f"{faster:.2f}" if faster else "-"]
        table.add_row(row["name"], row["kind"], *cells, notes(metrics))
    return table


def notes(metrics: dict[str, Any]) -> str:
    """Stage-specific figures for the table's last column (teacher accuracy, peers, the kept
    vocabulary, backend, a missed sparsity target, churn)."""
    parts = []
    if metrics.get("teacher_accuracy"):
        parts.append("teacher " + "/".join(f"{value:.3f}" for value in metrics["teacher_accuracy"]))
    if metrics.get("knn_accuracy") is not None:  # a pre-training row: its representation, probed without training a head
        parts.append(f"{metrics.get('method', 'pretrain')}: k-NN accuracy {metrics['knn_accuracy']:.4f} "
                     f"(val {metrics.get('val_knn_accuracy', float('nan')):.4f}, {metrics.get('knn_labels', '?')} labels)")
    if metrics.get("frozen_params"):
        parts.append(f"{metrics['frozen_params']:,} params frozen")
    if metrics.get("peer_accuracy"):
        parts.append("peers " + "/".join(f"{value:.3f}" for value in metrics["peer_accuracy"]))
    if metrics.get("vocab_kept"):
        parts.append(f"vocab {metrics['vocab_kept']:,} of {metrics['vocab_size']:,}")
    if metrics.get("embedding_rank"):
        parts.append(f"embeddings rank {metrics['embedding_rank']}")
    if metrics.get("compile"):
        parts.append(metrics["compile"].split(";")[0])
    if metrics.get("backend"):
        parts.append(metrics["backend"])
    if metrics.get("kernels"):
        parts.append(metrics["kernels"])
    if gap := sparsity_gap(metrics):
        parts.append(gap)
    if metrics.get("churn") is not None:
        parts.append(f"churn {metrics['churn']:.3f}")
    return ", ".join(parts)


def render_text(renderable: Any, width: int = 160) -> str:
    """Render a Rich object to plain text (for run.log and non-terminal output)."""
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()
