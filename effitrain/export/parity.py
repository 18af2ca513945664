"""Parity of an exported artifact: the run's test split through the artifact, loaded by its
runtime alone in a fresh interpreter (`runner.py`), compared with the stage's saved predictions."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from effitrain.errors import ConfigError
from effitrain.export.target import Target

PARITY_TIMEOUT_S = 600


def split_inputs(data: Any, task: Any) -> tuple[dict[str, Any], list[str], bool]:
    """The whole test split's inputs as numpy arrays by input name (loader order)."""
    import numpy as np
    import torch

    from effitrain.export.formats import input_names

    parts: dict[str, list[Any]] = {}
    names: list[str] = []
    keyed = False
    for batch in data.test:
        inputs = task.split(batch)[0]
        names, keyed = input_names(inputs)
        for name, tensor in zip(names, inputs.values() if keyed else (inputs,)):
            parts.setdefault(name, []).append(tensor.cpu())
    return {name: np.ascontiguousarray(torch.cat(tensors).numpy()) for name, tensors in parts.items()}, names, keyed


def example_rows(arrays: dict[str, Any], keyed: bool, rows: int) -> Any:
    import torch

    tensors = {name: torch.from_numpy(value[:rows]) for name, value in arrays.items()}
    return tensors if keyed else next(iter(tensors.values()))


def run_fresh(spec: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Run `runner.py` in a fresh interpreter (from an empty folder, so nothing of effitrain is on
    its path) and return its result.

    Raises:
        ConfigError: the artifact did not load or run there (the child's last error line), or
            the child imported effitrain after all.
    """
    source = (Path(__file__).with_name("runner.py")).read_text()
    spec_path, result_path = scratch / "spec.json", scratch / "result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    empty = scratch / "cwd"
    empty.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    try:
        done = subprocess.run([sys.executable, "-c", source, str(spec_path)], cwd=empty, env=env, capture_output=True, text=True, timeout=PARITY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"export: the parity check in a fresh process ran over {PARITY_TIMEOUT_S} s") from None
    if done.returncode != 0 or not result_path.is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise ConfigError(f"export: the {spec['format']} artifact did not load and run without effitrain ({lines[-1][:300] if lines else 'no output'})")
    result = json.loads(result_path.read_text())
    if result["effitrain_imported"]:
        raise ConfigError("export: the fresh process imported effitrain; the artifact is not standalone")
    return result


def _digest(tensor: Any) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _bytes(path: Path) -> dict[str, int]:
    if path.is_dir():
        return {str(file.relative_to(path)): file.stat().st_size for file in sorted(path.rglob("*")) if file.is_file()}
    return {path.name: path.stat().st_size}


def check_parity(model: Any, fmt: str, staged: Target, arrays: dict[str, Any], names: list[str], keyed: bool, saved: dict[str, list[int]],
            measure: Any, data: Any, task: Any) -> dict[str, Any]:
    """Load the staged artifact without effitrain, predict the test split, compare, time."""

    import numpy as np
    import torch

    scratch = Path(tempfile.mkdtemp(prefix="effitrain-parity-"))
    try:
        inputs_file = scratch / "inputs.npz"
        np.savez(inputs_file, **arrays)
        spec = {"format": fmt, "artifact": str(staged.artifact.resolve()), "inputs": str(inputs_file), "input_names": names,
                "batch_size": int(data.test.batch_size or 64), "latency_batch": int(measure.batch_size), "warmup": int(measure.warmup),
                "repeats": int(measure.repeats), "threads": measure.get("threads"), "cuda": torch.cuda.is_available()}
        result = run_fresh(spec, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if fmt == "safetensors":  # the file as read alone, tensor by tensor; predictions from those weights rebuilt
        result = {**result, **_safetensors_parity(model, staged.artifact, result, data, task, measure, arrays, keyed)}
    labels, predicted = saved["labels"], result["predictions"]
    if len(predicted) != len(saved["predictions"]):
        raise ConfigError(f"export: the test split has {len(predicted)} examples now and {len(saved['predictions'])} in the run's predictions; the data changed")
    files = _bytes(staged.artifact)
    return {
        "files": files,
        "bytes": sum(files.values()),
        "inputs": names,
        "outputs": ["logits"],
        "examples": len(predicted),
        "test_accuracy": sum(p == y for p, y in zip(predicted, labels)) / len(labels),
        "stage_test_accuracy": sum(p == y for p, y in zip(saved["predictions"], labels)) / len(labels),
        "agreement": sum(p == q for p, q in zip(predicted, saved["predictions"])) / len(predicted),
        "latency_ms": result["latency_ms"],
        "latency_batch": result["latency_batch"],
        "batch_size": spec["batch_size"],  # predictions were made in test batches of this size (dynamic int8 quantizes per batch)
        "runtime": result["runtime"],
        "effitrain_imported": result["effitrain_imported"],
        **({"tensors_identical": result["tensors_identical"]} if "tensors_identical" in result else {}),
    }


def _safetensors_parity(model: Any, path: Path, alone: dict[str, Any], data: Any, task: Any, measure: Any, arrays: dict[str, Any], keyed: bool) -> dict[str, Any]:
    import torch

    from effitrain.checkpoint import load_weights
    from effitrain.measure import latency_ms
    from effitrain.precision import build_precision

    digests, state = alone["tensors"], model.state_dict()
    ours = {name: _digest(tensor) for name, tensor in state.items() if name in digests}
    if set(digests) - set(state) or any(ours[name] != digests[name] for name in ours):
        raise ConfigError(f"export: {path.name} read alone does not hold the stage's tensors")
    rebuilt = load_weights(copy.deepcopy(model), path).eval()
    precision = build_precision("fp32", torch.device("cpu"))
    predictions = task.evaluate(rebuilt, data.test, precision, keep_predictions=True)["predictions"]
    latency = latency_ms(rebuilt, example_rows(arrays, keyed, int(measure.batch_size)), precision, int(measure.warmup), int(measure.repeats), measure.get("threads"))
    return {"predictions": predictions, "latency_ms": latency, "latency_batch": int(measure.batch_size), "tensors_identical": True,
            "runtime": f"{alone['runtime']} alone (tensor digests); predictions from its weights loaded into the rebuilt module"}
