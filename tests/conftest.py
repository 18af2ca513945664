"""Shared helpers: run the real CLI in a subprocess on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tiny, fast settings every end-to-end test starts from.
TINY = ["recipe=baseline", "data=synthetic", "model=mlp", "model.hidden=[16]", "trainer.max_epochs=2",
        "measure.repeats=10", "measure.warmup=1", "report=false"]


TESTS_DIR = Path(__file__).resolve().parent


def run_cli(*args: str, cwd: Path, timeout: float = 240, user_code: bool = False) -> subprocess.CompletedProcess:
    """Run `effitrain ARGS` in `cwd` and return the finished process (text output).

    Args:
        user_code: put the tests folder on PYTHONPATH, as a user's own package (userplugins.py).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if user_code:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "effitrain.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


BATCH = """
import contextlib, io, json, os, sys, traceback
from effitrain.cli import main
results = []
for index, args in enumerate(json.loads(sys.argv[1])):
    folder = os.path.join(sys.argv[2], str(index))
    os.makedirs(folder)
    os.chdir(folder)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append([folder, code, out.getvalue(), err.getvalue()])
sys.stdout.write(json.dumps(results))
"""


def run_cli_batch(arg_lists: list[list[str]], root: Path, timeout: float = 600) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """Run `effitrain ARGS` for each list in ONE fresh Python process (the CLI's own entry point,
    each in a new empty folder under `root`): bad-input checks without paying torch's import per
    case. Returns (folder, finished process) per list, in order."""
    import json

    done = subprocess.run([sys.executable, "-c", BATCH, json.dumps(arg_lists), str(root)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return [(Path(folder), subprocess.CompletedProcess(args, code, out, err)) for (folder, code, out, err), args in zip(json.loads(done.stdout), arg_lists)]


def run_and_kill(args: list[str], cwd: Path, marker: Path, timeout: float = 120) -> None:
    """Start `effitrain ARGS` in `cwd`, SIGKILL it as soon as `marker` exists (e.g. the first
    epoch checkpoint), and wait for it to end."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "effitrain.cli", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def assert_refused(result: subprocess.CompletedProcess, message: str, workdir: Path) -> None:
    """Bad input: exit code 2, one line on stderr containing `message`, no traceback, no run folder."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (workdir / "outputs").exists()


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def run_dirs(root: Path) -> list[Path]:
    """Run folders under root/outputs/<date>/."""
    return sorted(path for path in (root / "outputs").glob("*/*") if path.is_dir())


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def trainer_config(**settings):
    """A TrainerConfig with the YAML defaults, no progress bar, and `settings` applied."""
    from effitrain.trainer import TrainerConfig

    return TrainerConfig.with_defaults(**{"progress": "off", **settings})


def schedule(name: str = "cosine", warmup_steps: int = 0, min_lr_ratio: float = 0.0):
    """`make_scheduler(optimizer, total_steps)` for a Trainer built in Python."""
    from functools import partial

    from effitrain.trainer import schedule as schedules

    return partial(getattr(schedules, name), warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)


def negative_magnitude(name: str, weight):
    """A user saliency for tests (effitrain's `saliency: conftest.negative_magnitude`): cut the largest."""
    return -weight.abs()
