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
    """Run `effitrain ARGS` (as `python -m effitrain.cli ARGS`) in `cwd` and return the finished
    process (text output). The process is forked from a zygote that has imported torch and
    effitrain once (tests/cli_zygote.py); EFFITRAIN_TESTS_FRESH=1 starts each from scratch instead.

    Args:
        user_code: put the tests folder on PYTHONPATH, as a user's own package (userplugins.py).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if user_code:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH", "")]))
    if os.environ.get("EFFITRAIN_TESTS_FRESH") == "1":
        return subprocess.run([sys.executable, "-m", "effitrain.cli", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=env)
    return _zygote().run(list(args), Path(cwd), env, timeout)


class _Zygote:
    """The test session's one tests/cli_zygote.py process: requests in on its stdin, pids and exit codes back."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, str(TESTS_DIR / "cli_zygote.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        self._pending = b""
        if self._line(timeout=300) != "ready":
            raise RuntimeError("tests/cli_zygote.py did not start")

    def _line(self, timeout: float) -> str | None:
        """The next reply line, or None when `timeout` seconds pass first."""
        import select
        import time

        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError("tests/cli_zygote.py ended")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        return line.decode()

    def run(self, args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        import signal
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            request = {"args": args, "cwd": str(cwd.resolve()), "env": env, "stdout": str(out), "stderr": str(err)}
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            pid = int(self._line(timeout=60))
            code = self._line(timeout)
            if code is None:  # as subprocess.run does on a timeout: kill the process, then raise
                os.kill(pid, signal.SIGKILL)
                self._line(timeout=60)
                raise subprocess.TimeoutExpired(["effitrain", *args], timeout, out.read_text(), err.read_text())
            return subprocess.CompletedProcess(["effitrain", *args], int(code), out.read_text(errors="replace"),
                                               err.read_text(errors="replace"))


_ZYGOTE: list[_Zygote] = []


def _zygote() -> _Zygote:
    if not _ZYGOTE or _ZYGOTE[0].process.poll() is not None:
        _ZYGOTE[:] = [_Zygote()]
    return _ZYGOTE[0]


def run_cli_batch(arg_lists: list[list[str]], root: Path, timeout: float = 240) -> list[tuple[Path, subprocess.CompletedProcess]]:
    """`run_cli` for each list, each in a new empty folder under `root`: bad-input cases that
    share one test. Returns (folder, finished process) per list, in order."""
    results = []
    for index, args in enumerate(arg_lists):
        folder = root / str(index)
        folder.mkdir(parents=True)
        results.append((folder, run_cli(*args, cwd=folder, timeout=timeout)))
    return results


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
