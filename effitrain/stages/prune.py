"""`prune`: saliency × granularity × distribution × schedule, with masks kept exact during
training by a trainer hook and a per-layer sparsity table in the run folder and the log."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import MISSING, DictConfig
from torch import Tensor, nn

from effitrain.checkpoint import load_weights, saved_shapes, write_json
from effitrain.errors import not_allowed, require, require_choice
from effitrain.prune.hook import MaskHook
from effitrain.prune.masks import (
    GRADIENT_SALIENCIES,
    apply_masks,
    check_saliency,
    erk_sparsities,
    layer_sparsities,
    magnitude_masks,
    nm_masks,
    prunable,
    saliency_scores,
    sparsity_table,
)
from effitrain.prune.structured import channels, prune_channels, shrink_to
from effitrain.ledger import SPARSITY_TOLERANCE, render_text
from effitrain.stages.base import Context, Prepared, StageResult, Stored
from effitrain.stages.train import PlannedFit, TrainingStage, make_trainer, plan_fit

log = logging.getLogger("effitrain")

GRANULARITIES = ("unstructured", "structured", "nm")
SCHEDULES = ("oneshot", "iterative", "gradual", "rigl")
DISTRIBUTIONS = ("global", "uniform", "erk")


@dataclass
class PreparedPrune(Prepared):
    """The model to prune and example inputs for tracing its dependency graph."""

    example: Any


@dataclass
class Prune(Stored, TrainingStage):
    """Prune the incoming model, fine-tuning with the one trainer.

    Fields:
        granularity: unstructured (weights) | structured (channels/neurons, physically removed) | nm (N:M).
        saliency: l1 | l2 | taylor | obd | random | a dotted path to fn(name, weight) -> scores.
        sparsity: target fraction of weights (unstructured/nm: n/m is implied) or channels removed, in [0, 1).
        distribution: global (one threshold across layers) | uniform (the same in every layer) |
            erk (Erdős–Rényi-Kernel densities reaching `sparsity` over all layers; unstructured).
        overrides: {module-name pattern: sparsity}; 0 leaves a layer dense. On the command line:
            stage.NAME.overrides='{features.0: 0, classifier.*: 0.5}' (null: none).
        schedule: oneshot | iterative (`rounds` prune/fine-tune rounds) | gradual (Zhu & Gupta,
            inside training) | rigl (constant sparsity with drop/regrow; unstructured only).
        fine_tune: train after one-shot pruning / after each round (epochs: this stage's trainer).
        rounds: iterative rounds; round r reaches 1 - (1 - sparsity)^(r / rounds).
        initial_sparsity, begin_step, end_step, frequency: gradual ramp s_i → sparsity from
            begin_step to end_step (null: 75% of the stage's steps), masks updated every `frequency` steps.
        drop_fraction: RigL's initial drop/regrow fraction (cosine-decayed to 0 at end_step).
        n, m: N:M pattern (keep n of every m consecutive weights).
        saliency_batches: training batches whose gradients score weights for taylor and obd
            saliency (obd: per-example gradients, for the Fisher diagonal).
        storage: auto | compressed | plain (see `Stored`): masked models are saved as bitmask +
            values, zstd-compressed, so bytes on disk shrink with sparsity.
    """

    kind = "prune"
    renamed = {"taylor_batches": "saliency_batches"}  # run folders made before the rename still load
    granularity: str = MISSING
    saliency: str = MISSING
    sparsity: float = MISSING
    distribution: str = MISSING
    overrides: Optional[Dict[str, float]] = MISSING
    schedule: str = MISSING
    fine_tune: bool = MISSING
    rounds: int = MISSING
    initial_sparsity: float = MISSING
    begin_step: int = MISSING
    end_step: Optional[int] = MISSING
    frequency: int = MISSING
    drop_fraction: float = MISSING
    n: int = MISSING
    m: int = MISSING
    saliency_batches: int = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("granularity", self.granularity, GRANULARITIES)
        require_choice("schedule", self.schedule, SCHEDULES)
        require_choice("distribution", self.distribution, DISTRIBUTIONS)
        check_saliency(self.saliency, "saliency")
        require(0 <= self.sparsity < 1, "sparsity", self.sparsity, "a number in [0, 1)")
        require(0 <= self.initial_sparsity <= self.sparsity, "initial_sparsity", self.initial_sparsity, f"a number in [0, sparsity={self.sparsity}]")
        require(1 <= self.n < self.m, "n:m", f"{self.n}:{self.m}", "1 <= n < m, e.g. 2:4")
        for key in ("rounds", "frequency", "saliency_batches"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        require(0 < self.drop_fraction < 1, "drop_fraction", self.drop_fraction, "a number in (0, 1)")
        if self.granularity == "structured":
            require(self.schedule in ("oneshot", "iterative"), "schedule", self.schedule, "oneshot, iterative (with granularity 'structured')")
        if self.distribution == "erk":
            require(self.granularity == "unstructured", "distribution", self.distribution,
                    f"global, uniform (with granularity '{self.granularity}'; erk sets per-layer weight densities)")
        if self.granularity == "nm":
            require(self.schedule == "oneshot", "schedule", self.schedule, "oneshot (with granularity 'nm')")
        for pattern, value in (self.overrides or {}).items():
            require(0 <= float(value) < 1, f"overrides.{pattern}", value, "a sparsity in [0, 1)")
        if self.storage == "compressed" and (self.granularity == "structured" or self.target_sparsity == 0):
            why = "structured pruning leaves smaller dense layers" if self.granularity == "structured" else "sparsity 0 prunes nothing"
            raise not_allowed("storage", self.storage, f"auto, plain ({why}: nothing sparse to store)")

    def own_sparsities(self, model: nn.Module, where: str) -> dict[str, float | None]:
        """Each prunable layer's own sparsity (its override, or None: the global target's share),
        with the ERK target checked reachable (schedules reach it through lower ones).

        Raises:
            ConfigError: an override pattern that matches no prunable layer, or an unreachable ERK target.
        """
        own = layer_sparsities(list(prunable(model)), self.sparsity, self.overrides or {}, f"{where}.overrides")
        if self.distribution == "erk":
            erk_sparsities({layer: tuple(weight.shape) for layer, weight in prunable(model).items()}, self.sparsity, own, where)
        return own

    def check_model(self, model: nn.Module, cfg: DictConfig, name: str) -> None:
        self.own_sparsities(model, f"stage.{name}")

    def prepare(self, model: nn.Module, ctx: Context) -> PreparedPrune:
        return PreparedPrune(model, ctx.example_batch(2))

    # -- run ----------------------------------------------------------------------------------

    def run(self, name: str, prepared: PreparedPrune, ctx: Context) -> StageResult:  # type: ignore[override]
        where = f"stage.{name}"
        model = prepared.model
        own = self.own_sparsities(model, where)
        taylor = ([ctx.task.split(batch) for batch in itertools.islice(ctx.data.train, self.saliency_batches)]
                  if self.saliency in GRADIENT_SALIENCIES else None)
        if self.granularity == "structured":
            achieved = self._structured(name, model, prepared.example, ctx, own, taylor, where)
        else:
            measured = self._masked(name, model, ctx, own, taylor, where)
            found = [row for row in sparsity_table(model) if row["layer"] in measured]
            achieved = sum(row["zeros"] for row in found) / max(sum(row["weights"] for row in found), 1)
        rows = sparsity_table(model)
        if ctx.main:
            write_json(ctx.run_dir / "pruning" / f"{name}.json", rows)
        log.info("[%s] per-layer sparsity\n%s", name, render_text(_table(name, rows)).rstrip())
        target = self.target_sparsity
        if abs(achieved - target) > SPARSITY_TOLERANCE:
            log.warning("[%s] achieved sparsity %.4f differs from the target %.4f", name, achieved, target)
        return StageResult(model, {"granularity": self.granularity, "schedule": self.schedule,
                                   "target_sparsity": target, "achieved_sparsity": achieved})

    @property
    def target_sparsity(self) -> float:
        """What the stage asks for: `sparsity`, or 1 - n/m for N:M."""
        return 1 - self.n / self.m if self.granularity == "nm" else self.sparsity

    def measured_layers(self, own: dict[str, float | None]) -> list[str]:
        """The layers the stage's target applies to (N:M: every layer not left dense; otherwise
        those without an override of their own), over which achieved sparsity is measured."""
        if self.granularity == "nm":
            return [layer for layer, value in own.items() if value != 0]
        if self.distribution == "erk":  # its target is over every layer
            return list(own)
        return [layer for layer, value in own.items() if value is None] or list(own)

    def _structured(self, name: str, model: nn.Module, example: Any, ctx: Context, own: dict, taylor: list | None, where: str) -> float:
        """Prune channels (and fine-tune); returns the fraction of the governed layers' channels removed."""
        rounds = self.rounds if self.schedule == "iterative" else 1
        before, governed = channels(model), None
        for round_index in range(1, rounds + 1):
            # each round removes a share of what is left, so `rounds` rounds remove `sparsity` in all
            keep = (1 - self.sparsity) ** (1 / rounds)
            round_own = {key: (None if value is None else 1 - (1 - value) ** (1 / rounds)) for key, value in own.items()}
            pruned = prune_channels(model, example, 1 - keep, round_own, self.saliency, self.distribution, where,
                                    taylor, ctx.task.loss, ctx.device)
            governed = governed if governed is not None else pruned
            if self.fine_tune:
                stage = name if rounds == 1 else f"{name}_round{round_index}"
                # the architecture changes between rounds: a killed stage restarts from its input
                make_trainer(ctx, stage, self.training_overrides()).fit(model, ctx.data.train, ctx.data.val, resume=ctx.resume and rounds == 1)
        after = channels(model)
        return 1 - sum(after[layer] for layer in governed or []) / max(sum(before[layer] for layer in governed or []), 1)

    def _masked(self, name: str, model: nn.Module, ctx: Context, own: dict, taylor: list | None, where: str) -> list[str]:
        """Prune with masks (and train); returns the layers the target applies to."""
        hook: MaskHook | None = None
        measured = self.measured_layers(own)

        def remask(current: nn.Module, target: float) -> dict[str, Tensor]:
            names = [layer for layer in own if self.granularity != "nm" or own[layer] != 0]
            scores = saliency_scores(current, self.saliency, names, taylor, ctx.task.loss, ctx.device,
                                     torch.Generator().manual_seed(ctx.cfg.seed))
            if hook is not None:  # pruned weights stay pruned as the schedule advances
                for layer, mask in hook.masks.items():
                    scores[layer] = scores[layer].float().masked_fill(~mask, -1.0)
            if self.granularity == "nm":
                return nm_masks(scores, self.n, self.m, f"{where}.overrides")
            return magnitude_masks(scores, target, own, self.distribution, where)

        if self.schedule in ("oneshot", "rigl"):
            hook = MaskHook(remask(model, self.sparsity), "fixed" if self.schedule == "oneshot" else "rigl",
                            final_sparsity=self.target_sparsity, end_step=self.end_step, frequency=self.frequency,
                            drop_fraction=self.drop_fraction, measured=measured)
            rigl = self.schedule == "rigl"
            self._train(name, model, ctx, hook, train=self.fine_tune or rigl, restore_best=not rigl)
        elif self.schedule == "gradual":
            hook = MaskHook(remask(model, self.initial_sparsity), "gradual", remask, self.initial_sparsity, self.sparsity,
                            self.begin_step, self.end_step, self.frequency, measured=measured)
            self._train(name, model, ctx, hook, train=True, restore_best=False)
        else:
            for round_index in range(1, self.rounds + 1):
                target = 1 - (1 - self.sparsity) ** (round_index / self.rounds)
                hook = MaskHook(remask(model, target), "fixed", final_sparsity=target, measured=measured)
                self._train(f"{name}_round{round_index}", model, ctx, hook, train=self.fine_tune)
        # make permanent: the zeros are in the weights; the masking hook goes away with the trainer
        return measured

    def _train(self, name: str, model: nn.Module, ctx: Context, hook: MaskHook, train: bool, restore_best: bool = True) -> None:
        if not train:
            apply_masks(model, hook.masks)
            return
        # without restore_best: the best epoch may predate the final sparsity or masks
        overrides = self.training_overrides() if restore_best else self.training_overrides(restore_best=False)
        make_trainer(ctx, name, overrides, hooks=[hook]).fit(model, ctx.data.train, ctx.data.val, resume=ctx.resume)

    # -- the plan, for `effitrain show --schedule` ---------------------------------------------

    def planned(self, name: str, cfg: DictConfig, batches: int) -> list[PlannedFit]:
        """The fits with the target sparsity after each step (N:M: 1 - n/m; structured: the
        fraction of channels removed so far)."""
        if self.schedule == "iterative":
            rounds = [(f"{name}_round{index}", 1 - (1 - self.sparsity) ** (index / self.rounds)) for index in range(1, self.rounds + 1)]
            fits = [plan_fit(cfg, round_name, self.training_overrides(), batches) for round_name, _ in rounds] if self.fine_tune else []
            for fit, (_, target) in zip(fits, rounds):
                fit.values["target_sparsity"] = [target] * len(fit.lr)
            return fits
        if self.schedule == "oneshot" and not self.fine_tune:
            return []
        fit = plan_fit(cfg, name, self.training_overrides(), batches)
        hook = MaskHook({}, "gradual" if self.schedule == "gradual" else "fixed", None, self.initial_sparsity,
                        self.target_sparsity, self.begin_step, self.end_step, self.frequency)
        total = len(fit.lr)
        fit.values["target_sparsity"] = [hook.target(step, total) for step in range(1, total + 1)]
        return [fit]

    # -- resume of a completed stage ----------------------------------------------------------

    def load_model(self, prepared: PreparedPrune, path: Path) -> nn.Module:  # type: ignore[override]
        model = prepared.model
        if self.granularity == "structured":  # the shapes the run kept, read from the saved file
            shrink_to(model, saved_shapes(path), prepared.example)
        return load_weights(model, path)


def _table(name: str, rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=f"{name}: per-layer sparsity")
    for column in ("layer", "type", "shape", "weights", "zeros", "sparsity"):
        table.add_column(column, justify="left" if column in ("layer", "type", "shape") else "right")
    for row in rows:
        table.add_row(row["layer"], row["type"], "x".join(map(str, row["shape"])), f"{row['weights']:,}", f"{row['zeros']:,}", f"{row['sparsity']:.3f}")
    return table
