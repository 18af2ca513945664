"""The final side-by-side re-time: interleaving and medians on a fake clock, the ledger rows it
rewrites, and a run whose rows come from it."""

from __future__ import annotations

import pytest

from effitrain import retime

from conftest import TINY, read_summary, run_cli


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def runner(self, name: str, milliseconds: list[float]):
        """A model whose successive calls take these times (cycled)."""
        count = {"n": 0}

        def run() -> None:
            self.calls.append(name)
            self.now += milliseconds[count["n"] % len(milliseconds)] / 1000.0
            count["n"] += 1

        return run


def test_rounds_interleave_models_and_take_medians(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(retime.time, "perf_counter", clock)
    runners = {"slow": clock.runner("slow", [4.0, 4.0, 40.0]), "fast": clock.runner("fast", [1.0])}
    latencies = retime.interleaved(runners, rounds=2, passes=3, warmup=1)
    assert latencies == pytest.approx({"slow": 4.0, "fast": 1.0})  # the 40 ms outlier is one pass of three: the median ignores it
    # warm-up once each, then rounds: every model once per round, passes in a row
    assert clock.calls == ["slow", "fast"] + (["slow"] * 3 + ["fast"] * 3) * 2


def test_apply_keeps_each_stages_own_timing_once() -> None:
    rows = [{"name": "a", "metrics": {"latency_ms": 3.0}}, {"name": "b", "metrics": {"latency_ms": 2.0}}]
    retime.apply(rows, {"a": 1.5, "b": 1.0})
    retime.apply(rows, {"a": 1.4, "b": 1.1})
    assert rows[0]["metrics"] == {"latency_ms": 1.4, "latency_ms_during_run": 3.0}
    assert rows[1]["metrics"] == {"latency_ms": 1.1, "latency_ms_during_run": 2.0}


def test_a_run_ends_with_every_stage_timed_side_by_side(workdir) -> None:
    result = run_cli("run", *TINY, "+stage@stage.int8=quantize", "hydra.run.dir=run", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(workdir / "run")["stages"]
    assert [row["name"] for row in rows] == ["train", "evaluate", "int8"]
    for row in rows:
        assert row["metrics"]["latency_ms"] > 0 and row["metrics"]["latency_ms_during_run"] > 0
    assert "final re-time, 3 stages side by side (5 rounds)" in result.stdout + result.stderr
    off = run_cli("run", *TINY, "+stage@stage.int8=quantize", "measure.final_retime=false", "hydra.run.dir=off", cwd=workdir)
    assert off.returncode == 0, off.stderr[-3000:]
    assert all("latency_ms_during_run" not in row["metrics"] for row in read_summary(workdir / "off")["stages"])
