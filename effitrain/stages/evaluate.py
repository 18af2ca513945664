"""`evaluate`: measure the model as it is; the ledger row shows test scores, size and latency,
and this stage adds the validation scores beside them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from effitrain.measure import evaluate
from effitrain.stages.base import Context, Stage


@dataclass
class Evaluate(Stage):
    """Record validation loss/accuracy next to the test metrics every ledger row has."""

    kind = "evaluate"

    def run(self, name: str, model: nn.Module, ctx: Context) -> nn.Module:
        scores = evaluate(model, ctx.data.val, ctx.precision)
        ctx.extra.update({f"val_{key}": value for key, value in scores.items()})
        return model
