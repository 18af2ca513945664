"""`evaluate`: measure the model as it is. Every ledger row has test and validation metrics,
size and latency; this stage adds a row for the model unchanged (e.g. at the end of a chain)."""

from __future__ import annotations

from dataclasses import dataclass

from effitrain.stages.base import Context, Prepared, Stage, StageResult


@dataclass
class Evaluate(Stage):
    """A ledger row for the incoming model (test and validation metrics, size, latency)."""

    kind = "evaluate"
    on_every_rank = False  # measures (and times) on rank 0; the other processes load what it saved

    def keeps_architecture(self) -> bool:
        return True

    def run(self, name: str, prepared: Prepared, ctx: Context) -> StageResult:
        return StageResult(prepared.model)
