"""Quantization: the affine formula's error bounds, per-channel vs per-tensor, straight-through
gradients, packed storage, the x86 dynamic int8 path, and the stages through the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from effitrain.errors import ConfigError
from effitrain.measure import count_parameters
from effitrain.models.cnn import SmallCNN
from effitrain.quant.affine import check_bits, choose_qparams, dequantize, fake_quantize, pack, qrange, quantize, unpack
from effitrain.layers import replace_layers, select_layers
from effitrain.quant.backends import QUANTIZABLE, QuantSpec
from effitrain.quant.weight_only import QuantizedWeight
from effitrain.quant.x86 import DynamicInt8Linear

from conftest import run_cli_batch, assert_refused, read_summary, run_cli


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
def test_round_trip_error_is_at_most_half_a_step(bits: int, scheme: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 32) * 3 + 1
    scale, zero_point = choose_qparams(x, bits, scheme, per_channel=False)
    q = quantize(x, scale, zero_point, bits, scheme)
    qmin, qmax = qrange(bits, scheme)
    assert q.min() >= qmin and q.max() <= qmax
    error = (dequantize(q, scale, zero_point) - x).abs()
    assert error.max() <= scale / 2 + 1e-6
    if scheme == "affine":  # min..max maps onto exactly 2^b - 1 steps
        assert scale.item() == pytest.approx((x.max().clamp(min=0) - x.min().clamp(max=0)).item() / (2**bits - 1))
    assert dequantize(quantize(torch.zeros(1), scale, zero_point, bits, scheme), scale, zero_point).item() == 0  # zero is exact


def test_per_channel_beats_per_tensor_on_a_skewed_tensor() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 64) * torch.logspace(-3, 1, 8).unsqueeze(1)  # channels of very different ranges
    errors, smallest = {}, {}
    for per_channel in (False, True):
        scale, zero_point = choose_qparams(x, 8, "symmetric", per_channel)
        error = dequantize(quantize(x, scale, zero_point, 8, "symmetric"), scale, zero_point) - x
        errors[per_channel] = error.pow(2).mean()
        smallest[per_channel] = (error[0].norm() / x[0].norm()).item()  # relative error of the smallest channel
    assert errors[True] < errors[False] / 2
    assert smallest[False] > 0.9 and smallest[True] < 0.02  # per-tensor rounds the small channel to zero


def test_fake_quant_passes_gradients_straight_through() -> None:
    x = torch.randn(4, 8, requires_grad=True)
    y = fake_quantize(x, 4, "symmetric", per_channel=True)
    assert not torch.equal(y, x) and len(torch.unique(y[0])) <= 15
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(8.0).expand(4, 8))


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_lossless_and_compact(bits: int) -> None:
    levels = torch.randint(*qrange(bits, "symmetric"), (7, 9), dtype=torch.int16)
    packed = pack(levels, bits, "symmetric")
    assert packed.dtype == torch.uint8 and packed.numel() == (63 if bits == 8 else 32)
    assert torch.equal(unpack(packed, bits, "symmetric", (7, 9)), levels)


def test_unsupported_bits_and_empty_models_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"bits = 3 is not allowed \(allowed: 4, 8\)"):
        check_bits(3, "bits")
    with pytest.raises(ConfigError, match="has no Linear/Conv1d/Conv2d/Embedding layers to quantize"):
        select_layers(nn.Sequential(nn.ReLU()), [], "stage.q.skip", QUANTIZABLE, "quantize")
    with pytest.raises(ConfigError, match=r"pattern 'conv9' matches no Linear/Conv1d/Conv2d/Embedding layer to quantize \(candidates: features.0, "):
        select_layers(SmallCNN((1, 8, 8), 10), ["conv9"], "stage.q.skip", QUANTIZABLE, "quantize")


def test_quantized_layers_stay_close_and_count_as_parameters() -> None:
    torch.manual_seed(0)
    model = SmallCNN((1, 8, 8), 10).eval()
    x = torch.randn(16, 1, 8, 8)
    for bits, tolerance in ((8, 0.05), (4, 0.6)):
        quantized = copy.deepcopy(model)
        replace_layers(quantized, select_layers(quantized, [], "q", QUANTIZABLE, "quantize"), lambda layer: QuantizedWeight(layer, bits, "symmetric", True))
        assert (quantized(x) - model(x)).abs().max() < tolerance
        assert count_parameters(quantized)[0] == count_parameters(model)[0]
        assert isinstance(quantized.features[0], QuantizedWeight)


def test_x86_dynamic_linear_matches_and_reloads_exactly() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    dynamic = DynamicInt8Linear(layer)
    x = torch.randn(8, 64)
    assert (dynamic(x) - layer(x)).abs().max() < 0.05
    fresh = DynamicInt8Linear(nn.Linear(64, 32))
    fresh.load_state_dict(dynamic.state_dict())
    assert torch.equal(fresh(x), dynamic(x))
    assert dynamic.state_dict()["qweight"].dtype == torch.int8


TINY = ["data=synthetic", "trainer.max_epochs=2", "stage.qat_int4.trainer.max_epochs=1", "measure.repeats=10", "measure.warmup=1"]


def test_quantize_recipe_rows_sizes_and_reload_in_a_fresh_process(workdir: Path) -> None:
    # backends named: what auto would pick on this 2-epoch model is measured, and tested below
    result = run_cli("run", "recipe=quantize_digits", *TINY, "stage.ptq_int8.backend=weight_only", "stage.ptq_int4.backend=weight_only",
                     "hydra.run.dir=run", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row["metrics"] for row in read_summary(workdir / "run")["stages"]}
    assert list(rows) == ["fp32", "ptq_int8", "ptq_int8_static", "ptq_int4", "qat_int4"]
    assert rows["ptq_int8_static"]["backend"].startswith("x86_static") and rows["ptq_int8_static"]["params"] > 20_000
    assert rows["ptq_int8"]["size_bytes"] < 0.35 * rows["fp32"]["size_bytes"]
    assert rows["ptq_int4"]["size_bytes"] < rows["ptq_int8"]["size_bytes"]
    assert "weight_only int8" in rows["ptq_int8"]["backend"] and "weight_only int4" in rows["ptq_int4"]["backend"]
    code = (
        "import json, sys; from pathlib import Path; from effitrain.runs import load_run_model; "
        "model, data = load_run_model(Path('run'), sys.argv[1]); "
        "from effitrain.tasks import Classification; from effitrain.precision import build_precision; import torch; "
        "print(json.dumps(Classification().evaluate(model, data.test, build_precision('fp32', torch.device('cpu')), keep_predictions=True)))"
    )
    for stage in ("ptq_int8", "ptq_int8_static", "qat_int4"):
        fresh = subprocess.run([sys.executable, "-c", code, stage], cwd=workdir, capture_output=True, text=True, timeout=300)
        assert fresh.returncode == 0, fresh.stderr[-3000:]
        scores = json.loads(fresh.stdout.strip().splitlines()[-1])
        assert scores["accuracy"] == rows[stage]["accuracy"], stage
        saved = json.loads((workdir / "run" / "predictions" / f"{stage}.json").read_text())
        assert scores["predictions"] == saved["predictions"], stage


BAD = [
    ("stage.ptq_int4.bits=3", "stage.ptq_int4.bits = 3 is not allowed (allowed: 4, 8)"),
    ("stage.ptq_int4.backend=x86_dynamic", "stage.ptq_int4.backend = 'x86_dynamic' needs bits = 8"),
    ("stage.ptq_int8.backend=tensorrt", "stage.ptq_int8.backend = 'tensorrt' is not allowed (allowed: auto, weight_only, x86_dynamic, x86_static)"),
    ("stage.ptq_int8.source=nope", "stage.ptq_int8.source = 'nope': no such earlier stage (allowed: fp32)"),
    ("stage.ptq_int8_static.calibration_batches=0", "stage.ptq_int8_static.calibration_batches = 0 is not allowed (allowed: an integer >= 1: observers need data)"),
    ("stage.ptq_int8_static.observer=median", "stage.ptq_int8_static.observer = 'median' is not allowed (allowed: minmax, moving_average, histogram)"),
]


@pytest.fixture(scope="module")
def bad_quant(tmp_path_factory) -> dict:
    """Every case of BAD through the CLI, in one process (see conftest.run_cli_batch)."""
    cases = [["run", "recipe=quantize_digits", *TINY, override] for override, _ in BAD]
    return dict(zip((override for override, _ in BAD), run_cli_batch(cases, tmp_path_factory.mktemp("refused"))))


@pytest.mark.parametrize("override,message", BAD, ids=[case[0] for case in BAD])
def test_bad_quant_input_is_one_line_and_no_run_folder(bad_quant: dict, override: str, message: str) -> None:
    folder, result = bad_quant[override]
    assert_refused(result, message, folder)


def test_a_backend_missing_on_the_device_names_the_available_ones() -> None:
    from effitrain.quant import backends

    assert backends.available(torch.device("cuda"), 8) == ["weight_only"]
    model = SmallCNN((1, 8, 8), 10)
    layers = select_layers(model, [], "stage.q.skip", QUANTIZABLE, "quantize")
    with pytest.raises(ConfigError, match=r"stage.q.backend = 'x86_dynamic' is not available on cuda at 8 bits \(available: weight_only\)"):
        backends.plan("x86_dynamic", model, layers, torch.device("cuda"), QuantSpec(8, "symmetric", True), "stage.q")


def test_auto_keeps_the_fastest_candidate_within_max_drop() -> None:
    from effitrain.quant.choose import Trial, choose, describe

    trials = [Trial("fp32", [], 0.980, 0.32, 116_000), Trial("x86_dynamic+weight_only", [], 0.978, 0.47, 33_000),
              Trial("weight_only", [], 0.975, 0.31, 33_000), Trial("x86_static", [], 0.940, 0.20, 42_000)]
    winner, reason = choose(trials, "max", 0.01, "latency")
    assert winner.name == "weight_only"  # x86_static is faster but lost 4 points
    assert reason == "fastest within 0.01 of fp32's validation metric; x86_static lost more"
    assert describe(trials, winner, reason, "latency").startswith("auto: fp32 0.320 ms, x86_dynamic+weight_only 0.470 ms, weight_only 0.310 ms")
    # within 5% of the fastest is a tie (timing noise): the smaller file wins it
    tie = [Trial("fp32", [], 0.98, 0.300, 116_000), Trial("x86_dynamic", [], 0.98, 0.200, 60_000), Trial("mix", [], 0.98, 0.209, 20_000)]
    winner, reason = choose(tie, "max", 0.01, "latency")
    assert winner.name == "mix" and reason.endswith("smallest of those within 5% of the fastest")
    # nothing quantized is faster: the model stays fp32 rather than getting slower
    slower = [Trial("fp32", [], 0.98, 0.30, 116_000), Trial("weight_only", [], 0.98, 0.90, 33_000)]
    assert choose(slower, "max", 0.01, "latency")[0].name == "fp32"
    # size as the goal: the smallest within the bound, with the latency it costs said
    winner, reason = choose(slower, "max", 0.01, "size")
    assert winner.name == "weight_only" and "costs 3.00x fp32's latency" in reason
    # a lower-is-better metric (loss): a rise counts as the drop; a diverged candidate (NaN) never wins
    losses = [Trial("fp32", [], 0.50, 1.0, 10), Trial("a", [], 0.505, 0.5, 10), Trial("b", [], 0.60, 0.1, 10), Trial("c", [], float("nan"), 0.01, 1)]
    assert choose(losses, "min", 0.01, "latency")[0].name == "a"
    assert choose(losses, "min", 0.01, "size")[0].name == "a"


def test_auto_choice_is_rebuilt_on_reload(workdir) -> None:
    from effitrain.runs import load_run_model

    result = run_cli("run", "recipe=quantize_digits", "trainer.max_epochs=3", "stage.qat_int4.trainer.max_epochs=1", "measure.repeats=10",
                     "measure.warmup=1", "report=false", "hydra.run.dir=run", cwd=workdir, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row["metrics"] for row in read_summary(workdir / "run")["stages"]}
    for stage in ("ptq_int8", "ptq_int4"):
        names = [trial["name"] for trial in rows[stage]["auto_trials"]]
        assert names[0] == "fp32" and rows[stage]["auto_choice"] in names and rows[stage]["backend"].startswith("auto: fp32 ")
    assert rows["ptq_int4"]["auto_choice"] == "weight_only" and rows["ptq_int4"]["size_bytes"] < rows["fp32"]["size_bytes"] / 4
    saved = json.loads((workdir / "run" / "predictions" / "ptq_int8.json").read_text())
    model, data = load_run_model(workdir / "run", "ptq_int8")
    with torch.no_grad():
        predicted = [int(p) for inputs, _ in data.test for p in model(inputs).argmax(-1)]
    assert predicted == saved["predictions"]  # the chosen structure, whichever it was, reloads exactly


def test_prefer_size_ranks_candidates_by_the_file_the_stage_saves(workdir) -> None:
    """After pruning, every candidate is measured as it would be stored (zeros compressed), not as
    plain safetensors: the fp32 candidate weighs what the pruned stage's file does, and the winner
    is the smallest of the files, the one the ledger then shows."""
    result = run_cli("run", "recipe=prune_gradual_digits", "data=synthetic", "model.channels=[8,16]", "model.hidden=16", "trainer.max_epochs=2",
                     "stage.dense.trainer.max_epochs=1", "measure.repeats=10", "measure.warmup=1", "measure.rounds=2",
                     "+stage@stage.small=quantize", "stage.small.prefer=size", "report=false", "hydra.run.dir=run", cwd=workdir, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row["metrics"] for row in read_summary(workdir / "run")["stages"]}
    trials = {trial["name"]: trial for trial in rows["small"]["auto_trials"]}
    assert trials["fp32"]["size_bytes"] == rows["pruned"]["size_bytes"]  # the same pruned model, stored compressed
    within = [t for t in trials.values() if rows["small"]["auto_trials"][0]["metric"] - t["metric"] <= 0.01 + 1e-12]
    assert rows["small"]["size_bytes"] == trials[rows["small"]["auto_choice"]]["size_bytes"] == min(t["size_bytes"] for t in within)
    assert (workdir / "run" / "checkpoints" / "02_small.dcz").stat().st_size == rows["small"]["size_bytes"]
