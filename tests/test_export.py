"""`effitrain export`: every stage kind of the digits recipes to each format it takes, loaded in
a fresh process without effitrain (export asserts it; these tests load the files again
themselves), integer weights kept in ONNX, parity failures and bad input refused, and
`measure.runtime=onnxruntime`. The BERT exports (hf, onnx) are in test_nlp.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from effitrain.errors import ConfigError
from effitrain.export import export_run

from conftest import TINY, assert_refused, read_summary, run_cli

FAST = ["measure.repeats=10", "measure.warmup=1", "report=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny digits runs: quickstart (train, distill, prune, int8 auto, evaluate) and
    compress_digits plus x86_static and int4 QAT stages (lowrank, cluster, static int8, qat)."""
    root = tmp_path_factory.mktemp("export_runs")
    # trained enough to have few near-ties: a model that predicts one class everywhere would agree with anything
    quick = run_cli("run", "recipe=quickstart", "trainer.max_epochs=8", "stage.student.trainer.max_epochs=10", "stage.prune.trainer.max_epochs=3",
                    "stage.int8.backend=x86_dynamic", "+stage@stage.wo8=quantize", "stage.wo8.source=prune", "stage.wo8.backend=weight_only",
                    *FAST, "hydra.run.dir=quick", cwd=root, timeout=400)
    assert quick.returncode == 0, quick.stderr[-3000:]
    compress = run_cli("run", "recipe=compress_digits", "trainer.max_epochs=10", "stage.lowrank.trainer.max_epochs=1", "stage.cluster4.trainer.max_epochs=1",
                       "model.hidden=32", "+stage@stage.static=quantize", "stage.static.source=fp32", "stage.static.backend=x86_static",
                       "stage.static.calibration_batches=2", "+stage@stage.qat4=qat", "stage.qat4.source=fp32", "stage.qat4.bits=4",
                       "stage.qat4.trainer.max_epochs=1", *FAST, "hydra.run.dir=compress", cwd=root, timeout=400)
    assert compress.returncode == 0, compress.stderr[-3000:]
    for name in ("quick", "compress"):
        accuracy = {row["name"]: row["metrics"]["accuracy"] for row in read_summary(root / name)["stages"]}
        assert min(accuracy.values()) > 0.5, accuracy  # parity on a constant predictor would prove nothing
    return {"quick": root / "quick", "compress": root / "compress"}


def saved_predictions(run_dir: Path, stage: str) -> list[int]:
    return json.loads((run_dir / "predictions" / f"{stage}.json").read_text())["predictions"]


def held_out_inputs(run_dir: Path) -> np.ndarray:
    from effitrain.export.parity import split_inputs
    from effitrain.pipeline import build_task
    from effitrain.runs import load_run_model
    from omegaconf import OmegaConf

    _, data = load_run_model(run_dir, None)
    return split_inputs(data, build_task(OmegaConf.load(run_dir / ".hydra" / "config.yaml").task))[0]["inputs"]


# a user's own script in a fresh interpreter: loads the artifact with its runtime alone, predicts, and says whether effitrain got imported
LOAD = {
    "onnx": "import onnxruntime as ort; s = ort.InferenceSession(path); logits = s.run(None, {'inputs': x})[0]",
    "torchscript": "import torch; m = torch.jit.load(path); logits = m(torch.from_numpy(x)).detach().numpy()",
}


def load_fresh(fmt: str, path: Path, inputs: np.ndarray, batch_size: int, tmp_path: Path) -> list[int]:
    """Predictions in batches of `batch_size`, as the run's test loader made them (dynamic int8 quantizes per batch)."""
    np.save(tmp_path / "all.npy", inputs)
    code = (f"import sys, json, numpy as np; path = {str(path)!r}; rows = np.load({str(tmp_path / 'all.npy')!r}); predictions = []\n"
            f"for start in range(0, len(rows), {batch_size}):\n"
            f"    x = rows[start:start + {batch_size}]; {LOAD[fmt]}; predictions += logits.argmax(-1).tolist()\n"
            "print(json.dumps([predictions, any(m.startswith('effitrain') for m in sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    predictions, imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert not imported
    return predictions


@pytest.mark.parametrize("run, stage, fmt", [
    ("quick", "teacher", "torchscript"),
    ("quick", "student", "onnx"),
    ("quick", "prune", "onnx"),
    ("quick", "int8", "torchscript"),
    ("compress", "lowrank", "onnx"),
    ("compress", "cluster16", "onnx"),
    ("compress", "static", "torchscript"),
    ("compress", "static", "onnx"),
    ("compress", "qat4", "onnx"),
])
def test_stage_exports_load_without_effitrain_with_the_ledgers_predictions(runs, stage, run, fmt, tmp_path) -> None:
    suffix = {"onnx": ".onnx", "torchscript": ".pt"}[fmt]
    artifact, record = export_run(f"{runs[run]}:{stage}", fmt, tmp_path / f"{stage}{suffix}", 0.999)
    assert artifact.is_file() and (tmp_path / f"{stage}.export.json").is_file()
    assert json.loads((tmp_path / f"{stage}.export.json").read_text()) == record
    assert record["format"] == fmt and record["stage"] == stage and record["effitrain_imported"] is False
    assert record["bytes"] == artifact.stat().st_size and record["latency_ms"] > 0
    ledger = {row["name"]: row["metrics"] for row in read_summary(runs[run])["stages"]}[stage]
    assert record["test_accuracy"] == pytest.approx(ledger["accuracy"], abs=2 / record["examples"])
    loaded = load_fresh(fmt, artifact, held_out_inputs(runs[run]), record["batch_size"], tmp_path)
    agreement = np.mean(np.array(loaded) == np.array(saved_predictions(runs[run], stage)))
    assert agreement >= 0.999 and agreement == pytest.approx(record["agreement"])


def test_onnx_keeps_the_stages_integers(runs, tmp_path) -> None:
    import onnx
    from onnx import TensorProto

    export_run(f"{runs['quick']}:int8", "onnx", tmp_path / "int8.onnx", 0.99)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    assert {"MatMulInteger", "QuantizeLinear"} <= {node.op_type for node in graph.node}  # x86 dynamic int8 Linear layers
    assert sum(init.data_type == TensorProto.INT8 for init in graph.initializer) == 2  # the two Linear weights
    export_run(f"{runs['quick']}:wo8", "onnx", tmp_path / "wo8.onnx", 0.999)
    graph = onnx.load(str(tmp_path / "wo8.onnx")).graph
    assert "DequantizeLinear" in {node.op_type for node in graph.node}
    types = {init.name: init.data_type for init in graph.initializer}
    assert sum(t == TensorProto.INT8 for t in types.values()) >= 4
    assert not any(t == TensorProto.FLOAT and "weight" in name and "features.1" not in name and "features.5" not in name
                   for name, t in types.items()), types  # no float conv/linear weights (batch-norm ones are float)
    _, record4 = export_run(f"{runs['compress']}:qat4", "onnx", tmp_path / "qat4.onnx", 0.999)
    int4 = [init for init in onnx.load(str(tmp_path / "qat4.onnx")).graph.initializer if init.data_type == TensorProto.INT4]
    assert len(int4) >= 4  # int4 levels stay int4: half a byte each
    assert record4["agreement"] >= 0.999
    # a torch.ao static int8 graph becomes QDQ around float ops, with its own calibrated scales
    _, static = export_run(f"{runs['compress']}:static", "onnx", tmp_path / "static.onnx", 0.999)
    graph = onnx.load(str(tmp_path / "static.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    assert not any(init.data_type == TensorProto.FLOAT and init.name.endswith("weight") for init in graph.initializer)
    from effitrain.runs import load_run_model

    model, _ = load_run_model(runs["compress"], "static")
    scales = {float(init.float_data[0]) if init.float_data else float(onnx.numpy_helper.to_array(init)) for init in graph.initializer
              if init.name.endswith(("input_scale_0", "output_scale"))}
    assert float(model.features_0_input_scale_0) in scales  # the stage's calibrated activation scale, not a new one


def test_safetensors_export_is_checked_tensor_by_tensor(runs, tmp_path) -> None:
    artifact, record = export_run(f"{runs['quick']}:student", "safetensors", tmp_path / "student", 0.999)
    assert artifact == tmp_path / "student" / "model.safetensors" and (tmp_path / "student" / "export.json").is_file()
    assert record["tensors_identical"] is True and record["agreement"] == 1.0


def test_parity_failure_exits_2_and_leaves_nothing(runs, tmp_path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(runs["quick"], run_dir)
    path = run_dir / "predictions" / "prune.json"
    saved = json.loads(path.read_text())
    saved["predictions"] = [(p + 1) % 10 if index % 50 == 0 else p for index, p in enumerate(saved["predictions"])]
    path.write_text(json.dumps(saved))
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("export", f"{run_dir}:prune", "--format", "onnx", "-o", str(out / "prune.onnx"), cwd=tmp_path, timeout=300)
    assert_refused(result, "below --min-agreement 0.999; nothing written", tmp_path)
    assert list(out.iterdir()) == []


def test_bad_input_one_line_exit_2_nothing_written(runs, tmp_path) -> None:
    quick = runs["quick"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    cases = [
        ([str(tmp_path)], "not an effitrain run folder"),
        ([f"{quick}:nope"], "no completed stage 'nope' (allowed: teacher, student, prune, int8, evaluate, wo8)"),
        ([str(quick), "--format", "tflite"], "--format = 'tflite' is not allowed (allowed: onnx, torchscript, hf, safetensors)"),
        ([f"{quick}:int8", "--format", "onnx", "-o", str(tmp_path / "busy")], "already holds files"),
        ([f"{quick}:int8", "--format", "onnx", "-o", str(tmp_path / "model.pt")], "writes *.onnx or a folder"),
        ([f"{quick}:int8", "--format", "onnx", "-o", str(tmp_path / "missing" / "x.onnx")], "does not exist"),
        ([f"{quick}:student", "--format", "hf"], "cannot export as hf: SmallCNN is not a transformers model (allowed for this model: onnx, torchscript, safetensors)"),
        ([f"{runs['compress']}:static", "--format", "safetensors"], "is a torch quantized tensor, which safetensors cannot hold (allowed for this model: onnx, torchscript)"),
        ([f"{quick}:int8", "--min-agreement", "1.5"], "--min-agreement = 1.5 is not allowed"),
    ]
    for index, (args, message) in enumerate(cases):  # two through the CLI (one line, exit 2), the rest in-process (same code)
        if index in (0, 6):
            assert_refused(run_cli("export", *args, cwd=tmp_path, timeout=300), message, tmp_path)
            continue
        options = dict(zip(args[1::2], args[2::2]))
        with pytest.raises(ConfigError) as raised:
            export_run(args[0], options.get("--format"), Path(options["-o"]) if "-o" in options else None, float(options.get("--min-agreement", 0.999)))
        assert message in str(raised.value) and "\n" not in str(raised.value)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    assert not (quick / "artifacts").exists()
    stages = [row["name"] for row in read_summary(runs["compress"])["stages"]]
    assert "static" in stages and not (runs["compress"] / "artifacts").exists()


def test_default_export_goes_to_the_run_folder_and_never_overwrites(runs, tmp_path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(runs["quick"], run_dir)
    first = run_cli("export", str(run_dir), cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "wo8.onnx: onnx of stage wo8" in first.stdout
    assert (run_dir / "artifacts" / "wo8.onnx").is_file() and (run_dir / "artifacts" / "wo8.export.json").is_file()
    before = (run_dir / "artifacts" / "wo8.onnx").read_bytes()
    again = run_cli("export", str(run_dir), cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and "already exists; effitrain never overwrites" in again.stderr
    assert (run_dir / "artifacts" / "wo8.onnx").read_bytes() == before


def test_missing_runtime_is_refused_before_any_work(monkeypatch, runs, tmp_path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--format onnx needs onnxruntime, which is not installed \(pip install -e \"\.\[deploy\]\"\)"):
        export_run(f"{runs['quick']}:int8", "onnx", tmp_path / "x.onnx", 0.999)
    from effitrain.config.compose import compose
    from effitrain.pipeline import make_plan

    with pytest.raises(ConfigError, match=r"measure.runtime = 'onnxruntime' needs onnxruntime"):
        make_plan(compose([*TINY, "measure.runtime=onnxruntime"]))
    assert list(tmp_path.iterdir()) == []


def test_ledger_latency_timed_in_onnxruntime(workdir) -> None:
    result = run_cli("run", *TINY, "measure.runtime=onnxruntime", "hydra.run.dir=run", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_summary(workdir / "run")["stages"][0]["metrics"]
    assert metrics["latency_runtime"].startswith("onnxruntime ") and "CPUExecutionProvider" in metrics["latency_runtime"]
    assert metrics["latency_ms"] > 0 and metrics["latency_ms_torch"] > 0 and metrics["latency_ms"] != metrics["latency_ms_torch"]
    assert "latency in onnxruntime" in result.stdout + result.stderr
