"""`quantize` (post-training) and `qat` (quantization-aware training) stages: thin adapters
from config to the backend table in `effitrain.quant.backends` (weight_only, x86_dynamic,
x86_static, and `auto`, which offers each layer to the available backends in order). The ledger
row's `backend` says what converted which layers."""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

from omegaconf import MISSING, DictConfig
from torch import nn

from effitrain.checkpoint import compresses
from effitrain.compress.storage import SUFFIX as COMPRESSED
from effitrain.errors import ConfigError, not_allowed, require, require_choice
from effitrain.layers import replace_layers, select_layers
from effitrain.quant import backends, choose
from effitrain.quant.affine import SCHEMES, check_bits
from effitrain.quant.backends import QUANTIZABLE, Calibration, QuantSpec
from effitrain.quant.qat import FakeQuant, unwrap_fake_quant
from effitrain.quant.x86 import OBSERVERS
from effitrain.stages.base import Context, FromSource, Prepared, StageResult, Stored
from effitrain.stages.train import TrainingStage, make_trainer

log = logging.getLogger("effitrain")

GRANULARITIES = ("per_channel", "per_tensor")
FAKE_QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class PreparedQuant(Prepared):
    """The float model, example inputs (traced by whole-model backends) and, for a completed
    `auto` stage, the candidate it chose (read from the run's ledger, so a reload rebuilds it)."""

    example: Any
    choice: Optional[str] = None


def saved_choice(ctx: Context) -> Optional[str]:
    """The `auto_choice` of this stage's row in the run's ledger, when it completed with one."""
    path = ctx.run_dir / "summary.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text()).get("stages", [])
    return next((row["metrics"].get("auto_choice") for row in rows if row.get("name") == ctx.stage_name), None)


@dataclass
class QuantSettings:
    """Shared fields and model handling of `quantize` and `qat` (listed before `FromSource`,
    whose `starting_model` it uses).

    Fields:
        bits: 8 or 4.
        scheme: symmetric | affine.
        granularity: per_channel | per_tensor (weights).
        backend: auto | weight_only | x86_dynamic | x86_static (see effitrain.quant).
        skip: module-name patterns left in float (e.g. the first conv).
    """

    bits: int = MISSING
    scheme: str = MISSING
    granularity: str = MISSING
    backend: str = MISSING
    skip: List[str] = MISSING

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.scheme, self.granularity == "per_channel")

    def check_quant(self) -> None:
        check_bits(self.bits, "bits")
        require_choice("scheme", self.scheme, SCHEMES)
        require_choice("granularity", self.granularity, GRANULARITIES)
        backends.check(self.backend, self.spec(), "backend")

    def prepare(self, model: nn.Module, ctx: Context) -> PreparedQuant:
        return PreparedQuant(self.starting_model(model, ctx), ctx.example_batch(2), saved_choice(ctx))  # type: ignore[attr-defined]

    def plan(self, model: nn.Module, device: Any, where: str) -> list:
        """Which backend converts which of the layers not skipped."""
        layers = select_layers(model, self.skip, f"{where}.skip", QUANTIZABLE, "quantize")
        return backends.plan(self.backend, model, layers, device, self.spec(), where)

    def quantize(self, model: nn.Module, device: Any, example: Any, batches: Any, where: str) -> tuple[nn.Module, str]:
        """Convert the chosen layers; return the model and the ledger's backend description."""
        steps, spec = self.plan(model, device, where), self.spec()
        return backends.convert(model, steps, spec, Calibration(example, batches)), backends.describe(steps, spec)

    def load_model(self, prepared: PreparedQuant, path: Path) -> nn.Module:  # type: ignore[override]
        model = prepared.model
        device = next(model.parameters()).device
        if prepared.choice is None:
            steps = self.plan(model, device, "resume")
        else:  # what `auto` measured and kept
            layers = select_layers(model, self.skip, "resume.skip", QUANTIZABLE, "quantize")
            trials = {trial.name: trial for trial in choose.candidates(model, layers, device, self.spec(), traceable=True)}
            if prepared.choice not in trials:
                raise ConfigError(f"resume: this stage's auto choice {prepared.choice!r} does not run here (available: {', '.join(trials)})")
            steps = trials[prepared.choice].steps
        return backends.load(model, steps, self.spec(), Calibration(prepared.example), path)

    def save_plain(self, model: nn.Module, path: Path) -> Path:
        return backends.save(self.backend, model, path)

    def compressible(self, model: nn.Module) -> bool:
        return backends.whole_model_owner(model) is None  # torch.ao static graphs keep torch.save

    @property
    def model_suffix(self) -> str:
        return backends.suffix(self.backend)  # torch.load picks its reader by suffix


@dataclass
class Quantize(Stored, QuantSettings, FromSource):
    """Post-training quantization.

    Fields:
        storage: auto | compressed | plain (see `Stored`): a quantized model of a pruned one is
            saved with its zeros compressed (torch.ao static graphs keep torch.save).
        calibration_batches: x86_static: training batches the observers see (>= 1).
        observer: x86_static: activation range observer, minmax | moving_average | histogram.
        max_drop: auto: the largest loss of the validation headline metric a candidate may have
            against the unquantized model.
        prefer: auto: latency (keep the fastest candidate within max_drop) | size (the smallest file,
            as `storage` would write it: a pruned model's candidates are sized compressed).
    """

    kind = "quantize"
    on_every_rank = False  # measures (and times) on rank 0; the other processes load what it saved
    calibration_batches: int = MISSING
    observer: str = MISSING
    max_drop: float = 0.01  # defaults here as in conf/stage/quantize.yaml, for run folders made before these fields
    prefer: str = "latency"

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.scheme, self.granularity == "per_channel", self.observer, self.calibration_batches)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_quant()
        require_choice("observer", self.observer, OBSERVERS)
        require(isinstance(self.max_drop, (int, float)) and self.max_drop >= 0, "max_drop", self.max_drop, "a number >= 0 (in the task's headline metric)")
        require_choice("prefer", self.prefer, choose.PREFERENCES)
        if self.backend != backends.AUTO and backends.get(self.backend).calibrated:
            require(self.calibration_batches >= 1, "calibration_batches", self.calibration_batches, "an integer >= 1: observers need data")

    def check_model(self, model: nn.Module, cfg: DictConfig, name: str) -> None:
        """`storage: compressed` on a dense model is refused before the run: the stages before
        this one (train, evaluate, pretrain: those that keep the model's layers) make no zeros or
        shared weights, and quantizing does not either."""
        if self.storage == "compressed" and self.source is None and not compresses(model):
            raise ConfigError(f"stage.{name}.storage = 'compressed': the {type(model).__name__} this stage quantizes has no sparse or shared "
                              "weights the format can hold, and no stage before it makes any (allowed: auto, plain, or a prune or cluster stage first)")

    def run(self, name: str, prepared: PreparedQuant, ctx: Context) -> StageResult:  # type: ignore[override]
        where = f"stage.{name}"
        if sum(p.numel() for p in prepared.model.parameters()) == 0:
            raise ConfigError(f"{where}: the model is empty; nothing to quantize")
        def calibration_inputs() -> Any:  # a generator function: the loader is only opened if a backend calibrates
            for batch in ctx.data.train:
                yield ctx.task.split(batch)[0]

        if self.backend == backends.AUTO:
            return self.measured(name, prepared, ctx, calibration_inputs)
        model, description = self.quantize(prepared.model, ctx.device, prepared.example, calibration_inputs(), where)
        return StageResult(model, {"backend": description})

    def measured(self, name: str, prepared: PreparedQuant, ctx: Context, calibration_inputs: Callable[[], Any]) -> StageResult:
        """`auto`: convert a copy per candidate (fp32 included), measure validation metric, file
        size and latency (side by side, in the run's runtime), keep what `choose` picks."""
        from effitrain import retime

        model, spec, headline = prepared.model, self.spec(), ctx.task.headline
        layers = select_layers(model, self.skip, f"stage.{name}.skip", QUANTIZABLE, "quantize")
        trials, converted, unstorable = choose.candidates(model, layers, ctx.device, spec, traceable=True), {}, []
        with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
            for trial in list(trials):
                try:
                    candidate = backends.convert(copy.deepcopy(model), trial.steps, spec, Calibration(prepared.example, calibration_inputs()))
                except ConfigError as error:  # a whole-model backend that cannot trace this model
                    log.info("[%s] auto: %s left out (%s)", name, trial.name, error)
                    trials.remove(trial)
                    continue
                stored = self.store_candidate(candidate, Path(scratch) / f"{trial.name}.safetensors")  # as this stage saves it
                if self.storage == "compressed" and stored.suffix != COMPRESSED:
                    if trial is trials[0]:  # the unquantized model, handed in dense
                        raise ConfigError(f"stage.{name}.storage = 'compressed': the {type(model).__name__} this stage quantizes has no sparse "
                                          "or shared weights the format can hold (allowed: auto, plain)")
                    log.info("[%s] auto: %s left out (storage = 'compressed' cannot hold it)", name, trial.name)
                    unstorable.append(trial.name)
                    trials.remove(trial)
                    continue
                trial.size_bytes = stored.stat().st_size
                trial.metric = ctx.task.evaluate(candidate, ctx.data.val, ctx.precision)[headline]
                converted[trial.name] = candidate
        latencies = retime.retime(converted, ctx.example_batch(ctx.cfg.measure.batch_size), ctx.precision, ctx.cfg.measure)
        for trial in trials:
            trial.latency_ms = latencies[trial.name]
        winner, reason = choose.choose(trials, ctx.task.metrics[headline], self.max_drop, self.prefer)
        description = choose.describe(trials, winner, reason, self.prefer)
        if unstorable:
            description = description[:-1] + f"; {', '.join(unstorable)} left out: storage 'compressed' cannot hold it)"
        log.info("[%s] %s", name, description)
        return StageResult(converted[winner.name], {"backend": description, "auto_choice": winner.name, "auto_trials": choose.summary(trials)})


@dataclass
class QAT(QuantSettings, FromSource, TrainingStage):
    """Quantization-aware training: fake-quantized weights (and optionally 8-bit inputs) with
    straight-through gradients, trained by the ordinary trainer, then converted like `quantize`.

    Fields:
        activation_bits: null (weights only) or 8 (also fake-quantize layer inputs per batch, as
            a dynamic int8 kernel does).
    """

    kind = "qat"
    activation_bits: Optional[int] = MISSING

    def __post_init__(self) -> None:
        self.check_quant()
        if backends.get(self.backend).whole_model if self.backend != backends.AUTO else False:
            raise not_allowed("backend", self.backend, "for qat: " + ", ".join(n for n in backends.names() if n == backends.AUTO or not backends.get(n).whole_model))
        require(self.activation_bits in (None, 8), "activation_bits", self.activation_bits, "null, 8")

    def prepare(self, model: nn.Module, ctx: Context) -> PreparedQuant:
        return PreparedQuant(self.starting_model(model, ctx), None)  # layer backends only: nothing to trace

    def run(self, name: str, prepared: PreparedQuant, ctx: Context) -> StageResult:  # type: ignore[override]
        model, where = prepared.model, f"stage.{name}"
        names = select_layers(model, self.skip, f"{where}.skip", FAKE_QUANTIZABLE, "quantize")
        per_channel = self.granularity == "per_channel"
        replace_layers(model, names, lambda layer: FakeQuant(layer, self.bits, self.scheme, per_channel, self.activation_bits))
        result = make_trainer(ctx, name, self.training_overrides()).fit(model, ctx.data.train, ctx.data.val, resume=ctx.resume)
        unwrap_fake_quant(model)
        model, description = self.quantize(model, ctx.device, prepared.example, None, where)
        return StageResult(model, {"epochs": result.epochs, "steps": result.steps, "backend": description})
