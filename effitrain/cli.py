"""The `effitrain` command: run, resume, ls, show, churn, compare, report, export.

`run` hands its arguments to Hydra untouched (after moving -m/--multirun to the front, where
Hydra's argparse wants it). Before Hydra creates any run folder, the composed config of every
job is checked, so bad input stops with one line and exit code 2 and leaves nothing behind.
`--help`, `ls` and `show` never import torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from effitrain.errors import ConfigError, EffitrainError

app = typer.Typer(
    help="Config-driven experiment runner for efficient deep-learning training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_PASS_THROUGH = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-p", "--package", "-sc",
                 "--shell-completion", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                 "--experimental-rerun", "--resolve", "--version"}
_MULTIRUN = {"-m", "--multirun"}
_FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _guard(action: Callable[[], Any]) -> Any:
    """Run `action`, turning project errors into one line on stderr and exit code 2."""
    try:
        return action()
    except EffitrainError as error:
        _fail(str(error))


def _check_run_dir(overrides: list[str], multirun: bool) -> None:
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    for override in overrides:
        if override.startswith(key):
            folder = Path(override[len(key):].strip("'\""))
            if folder.is_dir() and any(folder.iterdir()):
                raise ConfigError(
                    f"{key[:-1]} = '{folder}' already holds files; effitrain never overwrites a run "
                    "(allowed: a new or empty folder; to continue a run: effitrain resume RUN_DIR)"
                )


def precheck(args: list[str], resuming: bool = False) -> None:
    """Compose and validate every job of `args` (each sweep combination) before Hydra runs.

    Raises:
        ConfigError: the first problem found.
    """
    from effitrain.config.compose import compose, expand_sweeps
    from effitrain.pipeline import check

    multirun = any(arg in _MULTIRUN for arg in args)
    overrides = [arg for arg in args if arg not in _MULTIRUN]
    if not resuming:
        _check_run_dir(overrides, multirun)
    combinations = expand_sweeps(overrides) if multirun else iter([overrides])
    for combination in combinations:
        check(compose(combination), keep_model=not multirun)


def launch(args: list[str], resuming: bool = False) -> None:
    """Hand `args` to the Hydra entry point, after the pre-run check."""
    args = [arg for arg in args if arg in _MULTIRUN] + [arg for arg in args if arg not in _MULTIRUN]
    from effitrain.parallel.launch import torchrun_world

    if torchrun_world():
        _launch_ranks(args, resuming)
        return
    if not any(arg.split("=")[0] in _PASS_THROUGH for arg in args):
        _guard(lambda: precheck(args, resuming))
    from effitrain.app import main

    sys.argv = ["effitrain", *args]
    main()


def _launch_ranks(args: list[str], resuming: bool) -> None:
    """One rank of a run torchrun started: every rank joins the process group; rank 0 checks the
    config, makes the one run folder and hands both to the others, which never start Hydra."""
    import os

    from effitrain.parallel import launch as ranks
    from effitrain.parallel.world import stop

    rank = int(os.environ["RANK"])
    if any(arg in _MULTIRUN for arg in args) or any(arg.split("=")[0] in _PASS_THROUGH for arg in args):
        if rank == 0:
            _fail("-m/--multirun and Hydra's own flags do not run under torchrun, which starts one run on many processes "
                  "(allowed: a single run; sweep with hydra/launcher=..., each job with trainer.devices=N)")
        raise typer.Exit(2)
    settings, device = _process_settings(args)
    _guard(lambda: ranks.join_torchrun(settings, device))
    try:
        if rank != 0:
            raise typer.Exit(ranks.follow())
        try:
            precheck(args, resuming)
        except EffitrainError as error:
            ranks.hand_out(None, None, None, str(error))
            _fail(str(error))
        from effitrain.app import main

        sys.argv = ["effitrain", *args]
        try:
            main()
        finally:
            if not ranks.handed_out():  # Hydra stopped before the run began: the others end too
                ranks.hand_out(None, None, None, "rank 0 did not start the run")
    finally:
        stop()


def _process_settings(args: list[str]) -> tuple[Any, Any]:
    """The trainer's process settings and the device, read leniently from the composed config
    before any check (rank 0's pre-run check reports what is wrong with them)."""
    import torch
    from omegaconf import OmegaConf

    from effitrain.config.compose import compose
    from effitrain.config.schema import TrainerConfig

    try:
        cfg = compose(args)
        node = OmegaConf.merge(OmegaConf.structured(TrainerConfig), cfg.trainer)
        device = str(cfg.device)
    except Exception:  # rank 0's check says what is wrong; join with defaults meanwhile
        node, device = OmegaConf.create({"devices": 1, "dist_backend": "auto", "dist_timeout_s": 1800.0}), "auto"
    cuda = torch.cuda.is_available() and device != "cpu"
    return node, torch.device("cuda" if cuda else "cpu")


@app.command(context_settings=_FORWARD)
def run(ctx: typer.Context) -> None:
    """Run a recipe. Arguments are Hydra's: recipe=NAME, key=value overrides, -m for sweeps.

    Examples: `effitrain run recipe=baseline trainer.max_epochs=3`,
    `effitrain run -m recipe=baseline seed=1,2,3`. Hydra's own help: `effitrain run --help`.
    """
    launch(list(ctx.args))


@app.command()
def resume(run_dir: Path = typer.Argument(..., help="The run folder of the interrupted run.")) -> None:
    """Continue an interrupted run in its own folder from its last checkpoint."""
    from omegaconf import OmegaConf

    from effitrain.runs import check_resumable

    _guard(lambda: check_resumable(run_dir))  # every file the resume reads, before anything is written
    overrides = [item for item in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml") if not str(item).startswith(("resume=", "hydra.run.dir="))]
    quoted = str(run_dir.resolve()).replace("\\", "\\\\").replace("'", "\\'")
    launch([*map(str, overrides), f"hydra.run.dir='{quoted}'", "resume=true"], resuming=True)


@app.command("ls")
def list_configs() -> None:
    """List recipes (with what each shows) and the options of every config group."""
    from rich.console import Console
    from rich.table import Table

    from effitrain.config import CONF_DIR, DEFAULT_RECIPE, recipe_description, recipe_files

    console = Console()
    recipes = Table(title="recipes (effitrain run recipe=NAME)", title_justify="left")
    recipes.add_column("recipe")
    recipes.add_column("what it shows")
    for name, path in recipe_files().items():
        recipes.add_row(name + (" (default)" if name == DEFAULT_RECIPE else ""), recipe_description(path))
    console.print(recipes)
    groups = Table(title="config groups (GROUP=OPTION)", title_justify="left")
    groups.add_column("group")
    groups.add_column("options")
    for folder in sorted(path for path in CONF_DIR.iterdir() if path.is_dir() and path.name != "hydra"):
        groups.add_row(folder.name, ", ".join(sorted(file.stem for file in folder.glob("*.yaml"))))
    console.print(groups)


@app.command(context_settings=_FORWARD)
def show(
    ctx: typer.Context,
    schedule: bool = typer.Option(False, "--schedule", help="Print each training stage's planned steps, lr, sparsity and KD weight."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="With --schedule: also draw it to this new .png/.svg/.pdf file, or write every step to a .csv."),
) -> None:
    """Print the composed config as YAML, without running: `effitrain show recipe=baseline precision=bf16`;
    with --schedule, the planned schedules instead (`-o FILE` draws them)."""
    from omegaconf import OmegaConf

    from effitrain.config.compose import compose
    from effitrain.config.schema import validate

    if output is not None and not schedule:
        _fail("-o draws a schedule: use it with --schedule")
    if output is not None:
        _guard(lambda: _check_plot_file(output))
    if schedule:
        _show_schedule(list(ctx.args), output)
        return

    def compose_and_check() -> Any:  # types and ranges only: plain `show` must not import torch
        cfg = compose(list(ctx.args))
        validate(cfg, targets=False)
        return cfg

    cfg = _guard(compose_and_check)
    typer.echo(OmegaConf.to_yaml(cfg, resolve=True), nl=False)


PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".csv")  # a plot, or every planned step as a table


def _check_plot_file(path: Path) -> None:
    from effitrain.errors import require_choice

    require_choice("-o (file type)", path.suffix.lower() or "(none)", PLOT_SUFFIXES)
    if path.exists():
        raise ConfigError(f"-o {path}: already exists; effitrain never overwrites a file (allowed: a new file)")
    if not path.parent.is_dir():
        raise ConfigError(f"-o {path}: folder {path.parent} does not exist")


def _show_schedule(args: list[str], output: Optional[Path]) -> None:
    """The planned schedule of every trainer call, as tables of sampled steps (and a plot)."""
    from rich.console import Console
    from rich.table import Table

    from effitrain.config.compose import compose
    from effitrain.pipeline import planned_schedule

    fits = _guard(lambda: planned_schedule(compose(args)))
    console = Console(width=None if sys.stdout.isatty() else 160)
    if not fits:
        console.print("the recipe trains nothing: no schedule")
    for position, (stage, kind, fit) in enumerate(fits, start=1):
        steps = len(fit.lr)
        console.print(f"[{position}/{len(fits)} {fit.name}] {kind}: {steps:,} optimizer steps "
                      f"({fit.epochs} epochs x {fit.steps_per_epoch} steps, one per global batch)", markup=False, highlight=False)
        table = Table()
        table.add_column("step", justify="right")
        table.add_column("epoch", justify="right")
        table.add_column("lr", justify="right")
        for key in fit.values:
            table.add_column(key.replace("_", " "), justify="right")
        shown = sorted({1, steps, *(round(steps * tenth / 10) for tenth in range(1, 10))} - {0})
        for step in shown:
            table.add_row(f"{step:,}", str((step - 1) // fit.steps_per_epoch + 1), f"{fit.lr[step - 1]:.3e}",
                          *[f"{values[step - 1]:.4f}" for values in fit.values.values()])
        console.print(table)
    if output is not None and fits:
        from effitrain.report import write_schedule

        _guard(lambda: write_schedule(fits, output, "planned schedules: " + " ".join(args)))
        console.print(f"written: {output}")


@app.command()
def churn(
    run_a: Path = typer.Argument(..., help="A run folder."),
    run_b: Path = typer.Argument(..., help="Another run folder, tested on the same split."),
    stage: Optional[str] = typer.Option(None, help="The stage to compare (default: each run's last stage)."),
) -> None:
    """Prediction churn between two runs: the fraction of test examples they label differently."""
    from effitrain.predictions import compare_runs

    result = _guard(lambda: compare_runs(run_a, run_b, stage))
    typer.echo(
        f"churn {result['churn']:.4f} over {result['examples']} test examples "
        f"({result['stage_a']} accuracy {result['accuracy_a']:.4f} in {run_a}; {result['stage_b']} accuracy {result['accuracy_b']:.4f} in {run_b})"
    )


@app.command()
def compare(
    paths: list[Path] = typer.Argument(..., help="Run folders and sweep folders (searched for run folders)."),
    stage: Optional[str] = typer.Option(None, help="One row per run: this stage's (default: every stage of every run)."),
    sort: Optional[str] = typer.Option(None, help="Sort by a metric, e.g. latency_ms, val_accuracy, size_bytes."),
    output: str = typer.Option("table", "--format", help="table, csv, json or markdown."),
) -> None:
    """Many runs in one table: differing overrides as columns, seeds grouped (mean ± std, churn)."""
    from effitrain.compare import build_rows, find_runs, metric_keys, render, sort_rows

    def table() -> Any:
        runs = find_runs(paths)
        rows, differing = build_rows(runs, stage)
        keys = metric_keys(runs)
        return render(sort_rows(rows, sort, keys[0]), differing, keys, output)

    result = _guard(table)
    if isinstance(result, str):
        typer.echo(result)
    else:
        from rich.console import Console

        # a terminal folds to its width; a pipe or file gets the whole table on one line per row
        Console(width=None if sys.stdout.isatty() else 240).print(result)


@app.command()
def report(
    paths: list[Path] = typer.Argument(..., help="Run folders and sweep folders (searched for run folders)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="A new or empty folder (default: FIRST_PATH/report)."),
    metric: Optional[str] = typer.Option(None, help="The Pareto fronts' y axis (default: the task's headline metric, test split)."),
    stage: Optional[str] = typer.Option(None, help="Only this stage in the ledger and the fronts (default: every stage)."),
) -> None:
    """An HTML page with PNGs: ledgers, Pareto fronts, training curves, per-layer sparsity, schedules, seeds."""
    from effitrain.report import write_report

    folder = output if output is not None else paths[0] / "report"
    page, runs = _guard(lambda: write_report(paths, folder, metric, stage))
    typer.echo(f"{page} ({len(runs)} runs; open it in a browser)")


@app.command()
def export(
    target: str = typer.Argument(..., help="RUN_DIR or RUN_DIR:STAGE (default: the last completed stage)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="onnx, torchscript, hf or safetensors (default: onnx where the model has an ONNX graph)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="A new file (model.onnx, model.pt, model.safetensors) or a new/empty folder (default: RUN_DIR/artifacts/STAGE.SUFFIX)."),
    min_agreement: float = typer.Option(0.999, "--min-agreement", help="Least fraction of test predictions equal to the stage's own; below it nothing is written."),
) -> None:
    """Export a stage's model to a standalone artifact; parity is checked in a fresh process without effitrain."""
    from effitrain.export import export_run

    artifact, record = _guard(lambda: export_run(target, fmt, output, min_agreement))
    typer.echo(f"{artifact}: {record['format']} of stage {record['stage']}, {record['bytes']:,} bytes; test accuracy {record['test_accuracy']:.4f} "
               f"(stage {record['stage_test_accuracy']:.4f}), agreement {record['agreement']:.4f} on {record['examples']} examples; "
               f"{record['latency_ms']:.3f} ms per batch of {record['latency_batch']} in {record['runtime']}")


def main(argv: Optional[list[str]] = None) -> None:
    """Console-script entry point."""
    app(args=argv)


if __name__ == "__main__":
    main()
