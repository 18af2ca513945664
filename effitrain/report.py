"""`effitrain report`: one HTML page and its PNGs for runs and sweeps, drawn with matplotlib (Agg).

The page holds the ledger of every run (seeds grouped, as `effitrain compare` shows it), Pareto
fronts of the headline metric against latency, size on disk and parameters (every stage of
every run a point; the non-dominated ones joined and labelled with their overrides), training
curves from metrics.jsonl, per-layer sparsity of prune stages, schedules as the run logged them
(lr, target and achieved sparsity, KD weight, QAT windows) and, for seed groups, the accuracy
spread and the churn matrix. The PNGs sit beside the page, which opens offline. Nothing here
imports torch.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from effitrain.compare import Row, Run, build_rows, find_runs, metric_keys, table_cells
from effitrain.errors import ConfigError
from effitrain.ledger import sparsity_gap

COSTS = (("latency_ms", "latency (ms per batch)"), ("size_bytes", "size on disk (bytes)"), ("params", "parameters"))


def pareto_front(points: Sequence[tuple[float, float]], maximize_y: bool = True) -> list[int]:
    """Indices of the non-dominated points, by increasing cost x: no other point has a cost as
    low and a y as good, with one of them strictly better. Equal points are all kept."""
    sign = 1.0 if maximize_y else -1.0
    front = []
    for index, (x, y) in enumerate(points):
        dominated = any(
            other_x <= x and sign * other_y >= sign * y and (other_x < x or sign * other_y > sign * y)
            for other_x, other_y in points
        )
        if not dominated:
            front.append(index)
    return sorted(front, key=lambda index: (points[index][0], -sign * points[index][1]))


@dataclass
class Figure:
    """One PNG of the page: its file name, the section it belongs to, and a caption."""

    name: str
    section: str
    caption: str


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, the same on a laptop, a cluster node and CI
    import matplotlib.pyplot as plt

    return plt


def _short(value: str) -> str:
    """An override's value for a plot label: floats to 4 significant digits."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if "." in value and math.isfinite(number) else value


def _point_label(row: Row, differing: Sequence[str]) -> str:
    settings = [f"{key.removeprefix('stage.')}={_short(value)}" for key, value in row.settings.items() if key in differing and value != ""]
    return " ".join([*settings, row.stage]) if settings else row.stage


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl of a run (lines that are not JSON objects, e.g. a torn last line, are skipped)."""
    path = run_dir / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("stage"), str) and isinstance(record.get("step"), (int, float)):
                records.append(record)
    return records


@dataclass
class Trained:
    """One trained stage of a run as metrics.jsonl recorded it, placed on the run's step axis."""

    stage: str
    offset: int  # steps of the stages trained before it
    end: int  # offset + its last step
    steps: list[dict[str, Any]]
    epochs: list[dict[str, Any]]


def stage_series(records: list[dict[str, Any]]) -> list[Trained]:
    """Per trained stage in the order it ran: its step and epoch records, one after the other on
    the run's step axis. A resumed stage's repeated steps keep their last record."""
    order: list[str] = []
    steps: dict[str, dict[int, dict]] = {}
    epochs: dict[str, dict[int, dict]] = {}
    for record in records:
        stage = record["stage"]
        if stage not in order:
            order.append(stage)
        target = epochs if "epoch" in record else steps
        target.setdefault(stage, {})[int(record.get("epoch", record["step"]))] = record
    series, offset = [], 0
    for stage in order:
        stage_steps = [steps.get(stage, {})[key] for key in sorted(steps.get(stage, {}))]
        stage_epochs = [epochs.get(stage, {})[key] for key in sorted(epochs.get(stage, {}))]
        end = offset + max([int(record["step"]) for record in stage_steps + stage_epochs] or [0])
        series.append(Trained(stage, offset, end, stage_steps, stage_epochs))
        offset = end
    return series


def _owner(trained: str, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The ledger row a trained stage belongs to (`pruned_round2` belongs to `pruned`)."""
    for row in summary["stages"]:
        if trained == row["name"] or re.fullmatch(re.escape(row["name"]) + r"_round\d+", trained):
            return row
    return None


def schedule_figure(plt: Any, records: list[dict[str, Any]], summary: dict[str, Any], title: str) -> Any:
    """The lr (top) and target/achieved sparsity and KD weight (bottom) over the run's optimizer
    steps, stage after stage, with QAT stages shaded; None when nothing was trained."""
    series = stage_series(records)
    if not series:
        return None
    extras = [key for key in ("target_sparsity", "achieved_sparsity", "kd_weight")
              if any(key in record for trained in series for record in trained.steps)]
    figure, panels = plt.subplots(2 if extras else 1, 1, figsize=(10, 5.5 if extras else 3), sharex=True, squeeze=False)
    lr_axes = panels[0][0]
    for trained in series:
        lr_axes.plot([trained.offset + r["step"] for r in trained.steps], [r.get("lr", math.nan) for r in trained.steps], linewidth=1, label=trained.stage)
    lr_axes.set(ylabel="learning rate", title=title)
    if extras:
        axes = panels[1][0]
        styles = {"target_sparsity": "--", "achieved_sparsity": "-", "kd_weight": ":"}
        for key in extras:
            for index, trained in enumerate(series):
                found = [r for r in trained.steps if key in r]
                if found:
                    axes.plot([trained.offset + r["step"] for r in found], [r[key] for r in found], styles[key],
                              color=f"C{index}", linewidth=1.2, label=f"{trained.stage} {key.replace('_', ' ')}")
        axes.set(ylabel="fraction / weight", xlabel="optimizer step (run)", ylim=(-0.02, 1.02))
        axes.legend(fontsize=7)
    else:
        lr_axes.set_xlabel("optimizer step (run)")
    windows = [(trained.offset, trained.end) for trained in series if (_owner(trained.stage, summary) or {}).get("kind") == "qat"]
    for row in panels:
        for axes in row:
            for begin, end in windows:
                axes.axvspan(begin, end, color="orange", alpha=0.15, label="QAT window" if axes is lr_axes else None)
            axes.grid(alpha=0.3)
    lr_axes.legend(fontsize=7)
    return figure


class ReportWriter:
    """Draws the figures of `runs` into `image_dir` and writes the page to `page`.

    Args:
        runs: the runs (from `effitrain.compare.find_runs`).
        page: the HTML file to write.
        image_dir: where the PNGs go (links in the page are relative to the page's folder).
        metric: the y axis of the Pareto fronts (default: the task's headline metric, test split).
        stage: only this stage's rows in the ledger and the fronts (e.g. the stage a search optimised).
    """

    def __init__(self, runs: list[Run], page: Path, image_dir: Path, metric: str | None = None, stage: str | None = None) -> None:
        self.runs, self.page, self.image_dir = runs, page, image_dir
        self.rows, self.differing = build_rows(runs, stage)
        self.keys = metric_keys(runs)
        headline = runs[0].summary.get("headline", "accuracy")
        self.metric = metric or headline
        allowed = [key for key in self.keys[0] if key not in dict(COSTS)]
        if self.metric not in allowed:
            raise ConfigError(f"--metric {self.metric!r}: no run reports it (allowed: {', '.join(allowed)})")
        directions = runs[0].summary.get("directions", {})
        self.maximize = directions.get(self.metric.removeprefix("val_"), "max") == "max"
        self.figures: list[Figure] = []
        self.fronts: dict[str, list[tuple[str, float, float]]] = {}

    def write(self) -> Path:
        """Draw every figure, then write the page; returns the page's path."""
        self.plt = _pyplot()
        self.image_dir.mkdir(parents=True, exist_ok=True)
        for key, title in COSTS:
            self._pareto(key, title)
        for run in self.runs:
            records = read_metrics(run.path)
            self._curves(run, records)
            self._sparsity(run)
            self._schedule(run, records)
        self._seeds()
        self.page.parent.mkdir(parents=True, exist_ok=True)
        self.page.write_text(self._html())
        return self.page

    def _save(self, figure: Any, name: str, section: str, caption: str, bottom: float = 0.0) -> None:
        figure.tight_layout(rect=(0, bottom, 1, 1))
        figure.savefig(self.image_dir / name, dpi=110)
        self.plt.close(figure)
        self.figures.append(Figure(name, section, caption))

    # -- figures ------------------------------------------------------------------------------

    def _pareto(self, key: str, title: str) -> None:
        rows = [row for row in self.rows if row.mean(key) is not None and row.mean(self.metric) is not None]
        if not rows:
            return
        points = [(row.mean(key), row.mean(self.metric)) for row in rows]
        front = pareto_front(points, self.maximize)  # type: ignore[arg-type]
        equal: dict[tuple, list[int]] = {}  # equal points (a teacher every trial shares) get one label
        for index in front:
            equal.setdefault(points[index], []).append(index)
        labels = {same[0]: _point_label(rows[same[0]], self.differing) + (f" (+{len(same) - 1} equal)" if len(same) > 1 else "")
                  for same in equal.values()}
        shown = min(len(labels), 15)  # the front's labels are listed under the plot, numbered as on it
        figure, axes = self.plt.subplots(figsize=(9, 5.5 + 0.2 * shown))
        stages = sorted({row.stage for row in rows})
        markers = dict(zip(stages, "os^Dv<>ph*" * 10))
        for stage in stages:
            mine = [point for point, row in zip(points, rows) if row.stage == stage]
            axes.scatter([x for x, _ in mine], [y for _, y in mine], marker=markers[stage], alpha=0.55, label=stage)
        axes.plot([points[i][0] for i in front], [points[i][1] for i in front], "-", color="black", linewidth=1.2, label="Pareto front")
        for number, index in enumerate(labels, start=1):
            axes.annotate(str(number), points[index], textcoords="offset points", xytext=(4, 4), fontsize=8, weight="bold")
        listed = [f"{number}. {label}" for number, label in enumerate(labels.values(), start=1)][:shown]
        if len(labels) > shown:
            listed.append(f"... and {len(labels) - shown} more (listed on the page)")
        figure.text(0.01, 0.01, "\n".join(listed), fontsize=7, va="bottom", family="monospace")
        if key != "latency_ms" and max(x for x, _ in points) / max(min(x for x, _ in points), 1e-12) > 20:
            axes.set_xscale("log")
        axes.set_xlabel(title)
        axes.set_ylabel(self.metric)
        axes.set_title(f"{self.metric} against {title}: {len(points)} points, {len(labels)} on the front")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="best")
        self.fronts[key] = [(label, points[index][0], points[index][1]) for index, label in labels.items()]
        self._save(figure, f"pareto_{key}.png", "Pareto fronts", bottom=(0.16 * len(listed) + 0.1) / (5.5 + 0.2 * shown), caption=
                   f"{self.metric} against {title}; every stage of every run is a point (seed groups: their mean); "
                   "the non-dominated points are joined, numbered and listed below the plot.")

    def _curves(self, run: Run, records: list[dict[str, Any]]) -> None:
        series = stage_series(records)
        if not series:
            return
        figure, (loss_axes, val_axes) = self.plt.subplots(1, 2, figsize=(11, 4))
        monitor: str | None = f"val_{self.metric.removeprefix('val_')}"
        if not any(monitor in record for trained in series for record in trained.epochs):
            monitor = None
        for trained in series:
            if trained.steps:
                loss_axes.plot([trained.offset + r["step"] for r in trained.steps], [r["train_loss"] for r in trained.steps],
                               linewidth=1, label=trained.stage)
            if trained.epochs and monitor:
                val_axes.plot([trained.offset + r["step"] for r in trained.epochs], [r.get(monitor, math.nan) for r in trained.epochs],
                              "o-", markersize=3, label=trained.stage)
            for axes in (loss_axes, val_axes):
                axes.axvline(trained.offset, color="grey", linewidth=0.5, linestyle=":")
        loss_axes.set_yscale("log" if all(r["train_loss"] > 0 for trained in series for r in trained.steps) else "linear")
        loss_axes.set(xlabel="optimizer step (run)", ylabel="train loss", title="training loss")
        val_axes.set(xlabel="optimizer step (run)", ylabel=monitor or "", title=f"validation {(monitor or '').removeprefix('val_')} per epoch")
        for axes in (loss_axes, val_axes):
            axes.grid(alpha=0.3)
            if axes.lines:
                axes.legend(fontsize=7)
        self._save(figure, f"curves_{_slug(run.label)}.png", "Training curves", f"{run.label}: training loss and validation per stage (metrics.jsonl).")

    def _sparsity(self, run: Run) -> None:
        tables = {row["name"]: run.path / "pruning" / f"{row['name']}.json" for row in run.summary["stages"] if row["kind"] == "prune"}
        tables = {name: path for name, path in tables.items() if path.is_file()}
        if not tables:
            return
        loaded = {name: json.loads(path.read_text()) for name, path in tables.items()}
        layers = list(dict.fromkeys(item["layer"] for rows in loaded.values() for item in rows))
        figure, axes = self.plt.subplots(figsize=(max(6, 0.45 * len(layers) * len(loaded) + 2), 4.5))
        width = 0.8 / len(loaded)
        for index, (name, rows) in enumerate(loaded.items()):
            found = {item["layer"]: item["sparsity"] for item in rows}
            axes.bar([position + index * width for position in range(len(layers))], [found.get(layer, 0.0) for layer in layers],
                     width=width, label=name)
            metrics = next(row["metrics"] for row in run.summary["stages"] if row["name"] == name)
            if metrics.get("target_sparsity") is not None and metrics.get("granularity") != "structured":
                axes.axhline(metrics["target_sparsity"], linestyle="--", linewidth=0.8, color=f"C{index}")
        axes.set_xticks([position + 0.4 - width / 2 for position in range(len(layers))], layers, rotation=60, ha="right", fontsize=7)
        axes.set(ylabel="fraction of weights that are zero", ylim=(0, 1), title=f"{run.label}: per-layer sparsity (dashed: target)")
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3, axis="y")
        self._save(figure, f"sparsity_{_slug(run.label)}.png", "Per-layer sparsity", f"{run.label}: zero weights per layer after each prune stage.")

    def _schedule(self, run: Run, records: list[dict[str, Any]]) -> None:
        figure = schedule_figure(self.plt, records, run.summary, f"{run.label}: schedules as logged")
        if figure is None:
            return
        gaps = [f"{row['name']}: {sparsity_gap(row['metrics'])}" for row in run.summary["stages"] if sparsity_gap(row["metrics"])]
        caption = f"{run.label}: learning rate, target and achieved sparsity and KD weight per logged step; QAT windows shaded."
        self._save(figure, f"schedule_{_slug(run.label)}.png", "Schedules", caption + "".join(f" Missed target: {gap}." for gap in gaps))

    def _seeds(self) -> None:
        from effitrain.predictions import churn, read_predictions

        groups = {id(row.runs): row for row in self.rows if len(row.runs) > 1}
        for number, row in enumerate(groups.values(), start=1):
            members = row.runs
            stages = [item for item in self.rows if item.runs is members]
            figure, (spread, matrix) = self.plt.subplots(1, 2, figsize=(11, 4))
            for index, item in enumerate(stages):
                values = item.values.get(self.metric, [])
                spread.scatter([index] * len(values), values, alpha=0.7)
                if values:
                    spread.errorbar(index + 0.15, statistics.fmean(values), yerr=statistics.stdev(values) if len(values) > 1 else 0, fmt="k_", capsize=4)
            spread.set_xticks(range(len(stages)), [item.stage for item in stages], rotation=30, ha="right")
            spread.set(ylabel=self.metric, title=f"{len(members)} seeds: spread per stage (bar: mean ± std)")
            spread.grid(alpha=0.3)
            last = stages[-1].stage
            paths = [run.path / "predictions" / f"{last}.json" for run in members]
            if all(path.is_file() for path in paths):
                predictions = [read_predictions(path) for path in paths]
                values = [[churn(a["predictions"], b["predictions"]) if len(a["predictions"]) == len(b["predictions"]) else math.nan
                           for b in predictions] for a in predictions]
                image = matrix.imshow(values, cmap="viridis")
                figure.colorbar(image, ax=matrix)
                names = [run.label for run in members]
                matrix.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
                matrix.set_yticks(range(len(names)), names, fontsize=7)
                for i, line in enumerate(values):
                    for j, value in enumerate(line):
                        matrix.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=7)
                matrix.set_title(f"prediction churn between seeds ({last}, test)")
            else:
                matrix.set_axis_off()
                matrix.set_title("no saved predictions: churn unknown")
            settings = " ".join(f"{key}={value}" for key, value in row.settings.items()) or "same settings"
            self._save(figure, f"seeds_{number}.png", "Seed variance", f"{settings}: {self.metric} over seeds and their pairwise churn.")

    # -- the page -----------------------------------------------------------------------------

    def _html(self) -> str:
        base = Path(os.path.relpath(self.image_dir.resolve(), self.page.parent.resolve()))  # the page moves with its images
        headers, lines = table_cells(self.rows, self.differing, self.keys[1])
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>effitrain report</title>",
            "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}"
            "img{max-width:100%;border:1px solid #eee}figure{margin:1em 0}.failed{color:#b00}</style></head><body>",
            f"<h1>effitrain report: {len(self.runs)} run{'s' if len(self.runs) != 1 else ''}</h1>",
            "<h2>Runs</h2><table><tr><th>run</th><th>recipe</th><th>status</th><th>overrides</th><th>folder</th></tr>",
        ]
        for run in self.runs:
            status = run.summary.get("status", "unknown")
            error = f" ({html.escape(str(run.summary['error']))})" if run.summary.get("error") else ""
            overrides = " ".join(f"{key}={value}" for key, value in run.overrides.items())
            parts.append(f"<tr><td>{html.escape(run.label)}</td><td>{html.escape(str(run.summary.get('recipe', '')))}</td>"
                         f"<td class='{'failed' if status != 'completed' else ''}'>{html.escape(status)}{error}</td>"
                         f"<td>{html.escape(overrides)}</td><td>{html.escape(str(run.path))}</td></tr>")
        parts.append("</table><h2>Ledger</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells) + "</tr>" for cells in lines]
        parts.append("</table>")
        gaps = [f"{run.label} {row['name']}: {sparsity_gap(row['metrics'])}" for run in self.runs for row in run.summary["stages"] if sparsity_gap(row["metrics"])]
        if gaps:
            parts.append("<p class='failed'>Sparsity targets missed: " + "; ".join(html.escape(gap) for gap in gaps) + "</p>")
        sections = list(dict.fromkeys(figure.section for figure in self.figures))
        for section in sections:
            parts.append(f"<h2>{html.escape(section)}</h2>")
            if section == "Pareto fronts":
                for key, title in COSTS:
                    if key in self.fronts:
                        items = "".join(f"<li>{html.escape(label)}: {self.metric} {y:.4f}, {title} {x:,.4g}</li>" for label, x, y in self.fronts[key])
                        parts.append(f"<p>Front against {html.escape(title)} (numbered as on its plot):</p><ol>{items}</ol>")
            for figure in self.figures:
                if figure.section == section:
                    link = html.escape(str(base / figure.name))
                    parts.append(f"<figure><a href='{link}'><img src='{link}' alt='{html.escape(figure.caption)}'></a>"
                                 f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")
        parts.append("</body></html>\n")
        return "\n".join(parts)


def check_output(folder: Path) -> None:
    """Refuse an output folder that holds files (a report never overwrites one), or a file."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"-o {folder}: {'is a file' if not folder.is_dir() else 'already holds files'}; a report is never "
                          "written over files (allowed: a new or empty folder)")


def write_report(paths: Sequence[Path], output: Path, metric: str | None = None, stage: str | None = None) -> tuple[Path, list[Run]]:
    """`effitrain report`: output/index.html and its PNGs for the runs in `paths`.

    Raises:
        ConfigError: a bad path (see `find_runs`), an output folder holding files, an unknown
            metric or a stage no run has.
    """
    check_output(output)
    runs = find_runs(paths)
    writer = ReportWriter(runs, output / "index.html", output, metric, stage)
    return writer.write(), runs


def write_run_report(run_dir: Path) -> Path:
    """A finished run's own report.html, its PNGs in artifacts/plots/ (both replaced if present)."""
    runs = find_runs([run_dir])
    return ReportWriter(runs, run_dir / "report.html", run_dir / "artifacts" / "plots").write()


def planned_records(fits: list[tuple[str, str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(metrics.jsonl-like records, ledger-like stage list) of planned fits (stage, kind, PlannedFit),
    so a plan is drawn by the same code as a run's log."""
    records = [{"stage": fit.name, "step": step, "lr": fit.lr[step - 1], **{key: values[step - 1] for key, values in fit.values.items()}}
               for _, _, fit in fits for step in range(1, len(fit.lr) + 1)]
    return records, {"stages": [{"name": stage, "kind": kind, "metrics": {}} for stage, kind, _ in fits]}


def write_schedule(fits: list[tuple[str, str, Any]], path: Path, title: str) -> None:
    """The planned schedules of `fits`: every step as csv (a .csv path), else one figure (png, svg or pdf)."""
    records, summary = planned_records(fits)
    if path.suffix.lower() == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for record in records for key in record)))
            writer.writeheader()
            writer.writerows(records)
        return
    plt = _pyplot()
    figure = schedule_figure(plt, records, summary, title)
    if figure is None:
        raise ConfigError(f"-o {path}: the recipe trains nothing, so there is no schedule to draw")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
