"""`sparsify`: run a pruned model's sparse Linear and 1x1 convolution layers through sparse
kernels (CSR; on CUDA also 2:4 semi-structured for 2:4-pruned Linear layers) where that is
measured faster (`effitrain.prune.kernels`); the ledger row says what each layer measured."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

from omegaconf import MISSING, DictConfig
from torch import nn

from effitrain.checkpoint import load_weights, saved_shapes
from effitrain.errors import ConfigError, require
from effitrain.layers import select_layers
from effitrain.prune.kernels import CSR_TYPES, apply_kernels, choose_kernels, csr_unsupported, layer_sparsity, restore_kernels
from effitrain.stages.base import Context, FromSource, Prepared, StageResult

log = logging.getLogger("effitrain")


@dataclass
class PreparedSparsify(Prepared):
    """The model and the measurement batch its layers are timed on."""

    example: Any


@dataclass
class Sparsify(FromSource):
    """Per Linear or 1x1 convolution layer with at least `min_sparsity` zeros: dense vs each sparse
    kernel that runs here (CSR; on CUDA, torch's 2:4 kernels for a 2:4-patterned Linear layer),
    timed on the layer's real input (the run's measurement batch) under the run's precision,
    interleaved; the fastest kept where it is >= 5% faster than dense. Other convolutions stay
    dense (the ledger counts them).

    Fields:
        min_sparsity: layers with fewer zeros are not tried (CSR loses well before that).
        skip: module-name patterns left dense.
        passes: timed calls per layer and kernel in each of `measure.rounds` rounds.
    """

    kind = "sparsify"
    on_every_rank = False  # measures (and times) on rank 0; the other processes load what it saved
    min_sparsity: float = MISSING
    skip: List[str] = MISSING
    passes: int = MISSING

    def __post_init__(self) -> None:
        require(0 <= self.min_sparsity < 1, "min_sparsity", self.min_sparsity, "a number in [0, 1)")
        require(self.passes >= 1, "passes", self.passes, "an integer >= 1")

    def layers(self, model: nn.Module, where: str) -> tuple[list[str], list[str]]:
        """(the Linear and convolution layers not skipped, those of them with a CSR kernel)."""
        layers = select_layers(model, self.skip, f"{where}.skip", CSR_TYPES, "run sparse")
        candidates = [layer for layer in layers if csr_unsupported(model.get_submodule(layer)) is None]
        if not candidates:
            raise ConfigError(f"{where}: {type(model).__name__} has no Linear or 1x1 convolution layer to run sparse "
                              f"({', '.join(f'{layer} is {csr_unsupported(model.get_submodule(layer))}' for layer in layers[:3])})")
        return layers, candidates

    def check_model(self, model: nn.Module, cfg: DictConfig, name: str) -> None:
        self.layers(model, f"stage.{name}")

    def prepare(self, model: nn.Module, ctx: Context) -> PreparedSparsify:
        return PreparedSparsify(self.starting_model(model, ctx), ctx.example_batch(int(ctx.cfg.measure.batch_size)))

    def run(self, name: str, prepared: PreparedSparsify, ctx: Context) -> StageResult:  # type: ignore[override]
        model = prepared.model
        layers, candidates = self.layers(model, f"stage.{name}")
        sparse_enough = [layer for layer in candidates if layer_sparsity(model.get_submodule(layer)) >= self.min_sparsity]
        kinds = "Linear" if all(isinstance(model.get_submodule(layer), nn.Linear) for layer in candidates) else "Linear/1x1 conv"
        measure = ctx.cfg.measure
        choices = choose_kernels(model, prepared.example, sparse_enough, int(measure.rounds), self.passes, int(measure.warmup), ctx.precision)
        for choice in choices:
            log.info("[%s] %s", name, choice.describe())
        chosen = {choice.layer: choice.kernel for choice in choices if choice.sparse}
        apply_kernels(model, chosen, ctx.precision.dtype)
        notes = [f"{len(candidates) - len(sparse_enough)} under {self.min_sparsity:.0%} zeros not tried"] if len(sparse_enough) < len(candidates) else []
        if len(candidates) < len(layers):
            notes.append(f"{len(layers) - len(candidates)} other convolutions have no CSR kernel")
        picked = ", ".join(f"{kernel} in {sum(k == kernel for k in chosen.values())}" for kernel in dict.fromkeys(chosen.values())) or "csr in 0"
        summary = f"{picked} of {len(candidates)} {kinds} layers" + (f" ({'; '.join(notes)})" if notes else "")
        return StageResult(model, {"kernels": summary, "kernel_choices": [choice.describe() for choice in choices]})

    def load_model(self, prepared: PreparedSparsify, path: Path) -> nn.Module:  # type: ignore[override]
        restore_kernels(prepared.model, saved_shapes(path))  # the layers the run chose, from the saved tensors
        return load_weights(prepared.model, path)
