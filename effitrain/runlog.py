"""Per-step metrics of a run: one JSON object per line in metrics.jsonl, mirrored to TensorBoard;
and the terminal's log handler."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any


class ConsoleHandler(logging.StreamHandler):
    """Writes log records to `sys.stdout` as it is when each record is emitted, not as it was when
    logging was configured: while Rich shows a live progress bar it replaces sys.stdout with a
    proxy that prints above the bar, so log lines never land on the bar's line."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler's constructor assigns it; the property wins
        pass


class RunLogger:
    """Appends metric points to `run_dir/metrics.jsonl` and `run_dir/tb/` (TensorBoard).

    Args:
        run_dir: the run folder.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, stage: str, step: int, metrics: dict[str, Any], **fields: Any) -> None:
        """Record `metrics` of `stage` at optimizer step `step` (extra `fields`, e.g. epoch, go to JSON only)."""
        record = {"time": round(time.time(), 3), "stage": stage, "step": step, **fields, **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{stage}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
