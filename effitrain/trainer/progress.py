"""What the trainer shows while it runs: a Rich progress bar on a terminal, one line per epoch
in logs (CI, files, pipes), so logs stay readable."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("effitrain")


class Progress:
    """Progress of one stage's training.

    Args:
        stage: stage name shown in the bar.
        total_steps: optimizer steps planned.
        mode: on, off or auto (a bar only when stdout is a terminal).
    """

    def __init__(self, stage: str, total_steps: int, mode: str) -> None:
        self.stage = stage  # shown as is, e.g. "2/5 pruned"
        self.bar = None
        if mode == "on" or (mode == "auto" and sys.stdout.isatty()):
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn

            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=True,
            )
            self.task = self.bar.add_task(stage, total=total_steps, status="")
            self.bar.start()

    def advance(self, step: int, loss: float, samples_per_second: float) -> None:
        """Move the bar to optimizer step `step` with the latest loss and throughput."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step, status=f"loss {loss:.4f}  {samples_per_second:,.0f} samples/s")

    def epoch_done(self, epoch: int, max_epochs: int, metrics: dict[str, float]) -> None:
        """Log one line for the finished epoch, rounded for people (metrics.jsonl keeps every digit)."""
        log.info("[%s] epoch %d/%d  %s", self.stage, epoch + 1, max_epochs, readable(metrics))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def readable(metrics: dict[str, float]) -> str:
    """`train_loss 0.2776  val_accuracy 0.9852  7,637 samples/s`: 4 significant digits, throughput whole."""
    parts = []
    for key, value in metrics.items():
        if key == "samples_per_second":
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    if "samples_per_second" in metrics:
        parts.append(f"{metrics['samples_per_second']:,.0f} samples/s")
    return "  ".join(parts)
