"""Per-step hooks: how a stage changes what happens inside the training loop.

A pruning stage re-applies its masks in `after_step`; a QAT stage toggles observers in
`on_epoch_start`; each hook's `state_dict` goes into the checkpoint so a resumed run carries on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from effitrain.trainer.loop import Trainer


class Hook:
    """Base class: every method is a no-op; override the ones you need."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Called once before the first step (after a resume has restored state)."""

    def on_epoch_start(self, trainer: "Trainer") -> None:
        """Called before each epoch; `trainer.epoch` is the epoch about to run."""

    def after_backward(self, trainer: "Trainer") -> None:
        """Called when gradients are ready (unscaled), before clipping and the optimizer step."""

    def after_step(self, trainer: "Trainer") -> None:
        """Called after each optimizer step; `trainer.step` counts steps done."""

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        """Called after each epoch's validation with that epoch's metrics."""

    def logged(self, trainer: "Trainer") -> dict[str, float]:
        """Figures logged with each step's loss and lr (e.g. where a schedule stands), so the
        run's metrics.jsonl records what happened and reports can draw it."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (tensors and plain containers only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
