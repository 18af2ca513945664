"""`effitrain compare`: many runs' ledgers in one table.

Arguments are run folders or sweep folders (searched recursively for run folders). Each run's
command-line overrides (.hydra/overrides.yaml) that differ between the runs become columns;
runs that differ only by `seed` are grouped into one row per stage: mean ± std over the seeds,
their count, and the mean pairwise churn of their test predictions. Sizes and speeds are
ratios against each run's first stage. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from effitrain.errors import ConfigError, require_choice
from effitrain.runfiles import read_summary

FORMATS = ("table", "csv", "json", "markdown")
COSTS = ("params", "nonzero_params", "sparsity", "size_bytes", "latency_ms", "smaller_x", "faster_x")
TABLE_COSTS = ("params", "sparsity", "size_bytes", "latency_ms", "smaller_x", "faster_x")  # the terminal's columns


def metric_keys(runs: list["Run"]) -> tuple[list[str], list[str]]:
    """(every metric for csv/json and --sort, the table's metrics): the task's headline metric on
    validation and test first (accuracy for classification), then the costs."""
    headline = runs[0].summary.get("headline", "accuracy") if runs else "accuracy"
    found = {key for run in runs for row in run.summary["stages"] for key, value in row["metrics"].items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)}
    first = [f"val_{headline}", headline]
    rest = sorted(key for key in found - set(first) - set(COSTS) if not key.startswith("latency_batch"))
    return [*first, *COSTS, *rest], [*first, *TABLE_COSTS]


@dataclass
class Run:
    """One run folder: its ledger, the overrides it was started with, and its name for the table."""

    path: Path
    summary: dict[str, Any]
    overrides: dict[str, str]
    label: str = ""


@dataclass
class Row:
    """One line of the comparison: a stage of one run, or of a group of seeds."""

    runs: list[Run]
    stage: str
    kind: str
    status: str
    settings: dict[str, str]
    values: dict[str, list[float]] = field(default_factory=dict)
    churn: float | None = None

    def mean(self, key: str) -> float | None:
        found = self.values.get(key) or []
        return statistics.fmean(found) if found else None


def _overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    items: list[str] = []
    if path.is_file():
        import yaml  # PyYAML, which Hydra and OmegaConf already need

        items = [str(item) for item in (yaml.safe_load(path.read_text()) or [])]
    found = {}
    for item in items:
        key, _, value = item.lstrip("+~").partition("=")
        if not key.startswith("hydra.") and key not in ("resume",):
            found[key] = value
    return found


def find_runs(paths: Iterable[Path]) -> list[Run]:
    """Every run folder named or found below the given folders, in path order.

    Raises:
        ConfigError: a path that does not exist, or holds no run folder (named).
    """
    runs: list[Run] = []
    for path in paths:
        if not path.exists():
            raise ConfigError(f"{path}: no such folder (allowed: run folders and sweep folders)")
        folders = [path] if (path / "summary.json").is_file() else sorted(
            (summary.parent for summary in path.rglob("summary.json") if (summary.parent / ".hydra").is_dir()),
            key=lambda folder: [int(part) if part.isdigit() else part for part in folder.parts],
        )
        if not folders:
            raise ConfigError(f"{path}: not a run folder and no run folders below it (allowed: run folders and sweep folders)")
        runs += [Run(folder, read_summary(folder), _overrides(folder)) for folder in folders]
    common = _common_parent([run.path for run in runs])
    for run in runs:
        relative = run.path.resolve().relative_to(common)
        run.label = str(relative) if relative.parts else run.path.resolve().name
    return runs


def _common_parent(paths: list[Path]) -> Path:
    parts = [path.resolve().parts for path in paths]
    shared = [items[0] for items in zip(*parts) if len(set(items)) == 1]
    return Path(*shared) if shared else Path("/")


def _ratio(first: dict[str, Any], metrics: dict[str, Any], key: str) -> float | None:
    return first[key] / metrics[key] if first.get(key) and metrics.get(key) else None


def build_rows(runs: list[Run], stage: str | None = None) -> tuple[list[Row], list[str]]:
    """Rows (seed groups merged) and the override keys that differ between the runs.

    Raises:
        ConfigError: `stage` is in no run (listing the stages there are).
    """
    keys = sorted({key for run in runs for key in run.overrides})
    differing = [key for key in keys if len({run.overrides.get(key, "") for run in runs}) > 1]
    if stage is not None and not any(row["name"] == stage for run in runs for row in run.summary["stages"]):
        there = sorted({row["name"] for run in runs for row in run.summary["stages"]})
        raise ConfigError(f"--stage {stage!r}: no run has that stage (allowed: {', '.join(there) or 'none: no run completed a stage'})")
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        settings = tuple((key, run.overrides.get(key, "")) for key in differing if key != "seed")
        groups.setdefault(settings, []).append(run)
    rows = []
    for settings, members in groups.items():
        shown = dict(settings) if len(members) > 1 else {key: members[0].overrides.get(key, "") for key in differing}
        names = [row["name"] for row in members[0].summary["stages"]] if stage is None else [stage]
        if not names:  # a run that failed before its first stage is listed with its status
            rows.append(Row(members, "-", "-", _status(members), shown))
        for name in names:
            row = Row(members, name, "", _status(members), shown)
            for run in members:
                stages = run.summary["stages"]
                found = next((item for item in stages if item["name"] == name), None)
                if found is None:
                    continue
                row.kind = found["kind"]
                metrics = dict(found["metrics"])
                metrics["smaller_x"] = _ratio(stages[0]["metrics"], metrics, "size_bytes")
                metrics["faster_x"] = _ratio(stages[0]["metrics"], metrics, "latency_ms")
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        row.values.setdefault(key, []).append(float(value))
            if len(members) > 1:
                row.churn = _seed_churn(members, name)
            rows.append(row)
    return rows, differing


def _status(members: list[Run]) -> str:
    found = sorted({run.summary.get("status", "unknown") for run in members})
    return "/".join(found)


def _seed_churn(members: list[Run], stage: str) -> float | None:
    """Mean pairwise churn of the stage's test predictions between the seeds (when all saved them)."""
    from effitrain.predictions import churn, read_predictions

    predictions = []
    for run in members:
        path = run.path / "predictions" / f"{stage}.json"
        if not path.is_file():
            return None
        predictions.append(read_predictions(path))
    if any(item["labels"] != predictions[0]["labels"] for item in predictions):
        return None  # tested on different examples: churn is undefined
    pairs = list(itertools.combinations(predictions, 2))
    return statistics.fmean(churn(a["predictions"], b["predictions"]) for a, b in pairs)


def sort_rows(rows: list[Row], key: str | None, allowed: list[str]) -> list[Row]:
    """Rows sorted by the mean of `key` (missing values last); keys no run has are refused."""
    if key is None:
        return rows
    require_choice("--sort", key, allowed)
    return sorted(rows, key=lambda row: (row.mean(key) is None, row.mean(key) or 0.0))


_FORMATS = {"params": "{:,.0f}", "nonzero_params": "{:,.0f}", "sparsity": "{:.3f}", "size_bytes": "{:,.1f}",
            "latency_ms": "{:.3f}", "smaller_x": "{:.2f}", "faster_x": "{:.2f}"}
_HEADERS = {"size_bytes": "size KiB", "latency_ms": "latency ms", "smaller_x": "smaller x", "faster_x": "faster x"}


def _cell(row: Row, key: str) -> str:
    found = [value / 1024 for value in row.values.get(key, [])] if key == "size_bytes" else row.values.get(key) or []
    if not found:
        return "-"
    fmt = _FORMATS.get(key, "{:.4f}")
    text = fmt.format(statistics.fmean(found))
    if len(found) > 1:
        text += " ± " + fmt.format(statistics.stdev(found))
    return text


def records(rows: list[Row], keys: list[str]) -> list[dict[str, Any]]:
    """Plain records (for csv/json): settings, stage, seeds, and every metric's mean (and std over seeds)."""
    out = []
    for row in rows:
        record: dict[str, Any] = {"run": ", ".join(run.label for run in row.runs), **row.settings, "stage": row.stage,
                                  "kind": row.kind, "status": row.status, "seeds": len(row.runs)}
        for key in keys:
            found = row.values.get(key) or []
            record[key] = statistics.fmean(found) if found else None
            if len(row.runs) > 1:
                record[f"{key}_std"] = statistics.stdev(found) if len(found) > 1 else None
        if len(row.runs) > 1:
            record["churn"] = row.churn
        out.append(record)
    return out


def table_cells(rows: list[Row], differing: list[str], shown: list[str]) -> tuple[list[str], list[list[str]]]:
    """(headers, text cells per row) of the human-readable table: run, differing overrides, stage,
    status, seeds and churn (when seeds are grouped), then the shown metrics."""
    grouped = any(len(row.runs) > 1 for row in rows)
    settings = [key for key in differing if not (grouped and key == "seed")]
    headers = ["run", *settings, "stage", "status", *(["seeds", "churn"] if grouped else []), *[_HEADERS.get(key, key) for key in shown]]
    lines = []
    for row in rows:
        label = row.runs[0].label if len(row.runs) == 1 else f"{row.runs[0].label} (+{len(row.runs) - 1} seeds)"
        cells = [label, *[row.settings.get(key, "") for key in settings], row.stage, row.status]
        if grouped:
            cells += [str(len(row.runs)), f"{row.churn:.4f}" if row.churn is not None else "-"]
        lines.append(cells + [_cell(row, key) for key in shown])
    return headers, lines


def render(rows: list[Row], differing: list[str], keys: tuple[list[str], list[str]], output: str) -> Any:
    """The comparison in `output` format: csv or json (every metric), markdown text or a Rich
    table (the headline metrics and costs; columns fold rather than cut numbers when narrow)."""
    require_choice("--format", output, FORMATS)
    every, shown = keys
    if output == "json":
        return json.dumps(records(rows, every), indent=2)
    if output == "csv":
        found = records(rows, every)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for record in found for key in record)))
        writer.writeheader()
        writer.writerows(found)
        return buffer.getvalue()
    headers, lines = table_cells(rows, differing, shown)
    grouped = "seeds" in headers
    if output == "markdown":
        table = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
        return "\n".join(table + ["| " + " | ".join(cells) + " |" for cells in lines])
    from rich.table import Table

    table = Table(title=f"{len({run.path for row in rows for run in row.runs})} runs")
    for index, header in enumerate(headers):
        table.add_column(header, justify="right" if index >= len(headers) - len(shown) - (2 if grouped else 0) else "left", overflow="fold")
    for cells in lines:
        table.add_row(*cells)
    return table
