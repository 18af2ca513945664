"""`effitrain export RUN_DIR[:STAGE]`: a stage's model as an artifact that loads without
effitrain (ONNX, TorchScript, a Hugging Face folder, or plain safetensors weights), with parity
proven on the run's test split in a fresh interpreter that never imports effitrain.

Everything is checked before anything is written; the artifact is built in a hidden staging
folder beside the target and moved into place only after its parity check passed.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from effitrain.errors import ConfigError, require, require_choice

FORMAT_NAMES = ("onnx", "torchscript", "hf", "safetensors")
RUNTIME_PACKAGES = {"onnx": ("onnxruntime", "onnx", "onnxscript"), "torchscript": (), "hf": ("transformers",), "safetensors": ("safetensors",)}
PARITY_TIMEOUT_S = 600


@dataclass
class Target:
    """Where an export goes: the artifact, its record and the tokenizer (text models), either as
    siblings of a file artifact or together inside `folder`."""

    artifact: Path
    record: Path
    tokenizer: Optional[Path]
    folder: Optional[Path] = None

    def paths(self) -> list[Path]:
        return [path for path in (self.artifact, self.record, self.tokenizer) if path is not None]

    def staged(self, staging: Path) -> "Target":
        """The same layout inside `staging` (which becomes `folder`, or holds the siblings)."""
        if self.folder is not None:
            return Target(*(staging / path.relative_to(self.folder) if path is not None else None
                            for path in (self.artifact, self.record, self.tokenizer)), folder=staging)
        return Target(*(staging / path.name if path is not None else None for path in (self.artifact, self.record, self.tokenizer)))

    def publish(self, staged: "Target") -> None:
        """Move a staged export into place (a folder in one rename)."""
        if self.folder is not None:
            if self.folder.is_dir():
                self.folder.rmdir()  # checked empty before
            os.replace(staged.folder, self.folder)  # type: ignore[arg-type]
            return
        for source, final in zip(staged.paths(), self.paths()):
            os.replace(source, final)


def parse_target(text: str) -> tuple[Path, Optional[str]]:
    """RUN_DIR or RUN_DIR:STAGE."""
    if ":" in text and not Path(text).exists():
        folder, _, stage = text.rpartition(":")
        return Path(folder), stage or None
    return Path(text), None


def plan_target(run_dir: Path, stage: str, fmt: str, output: Optional[Path], text: bool) -> Target:
    """The paths an export writes, refused when any exists (effitrain never overwrites).

    A folder format (hf) or an output without a suffix is a folder holding the model file,
    tokenizer/ and export.json; a file output (`int8.onnx`) gets `int8.export.json` and
    `int8.tokenizer/` beside it. The default is RUN_DIR/artifacts/STAGE.SUFFIX (or STAGE_hf/).

    Raises:
        ConfigError: a path that holds files, a suffix the format does not write, or a missing parent folder.
    """
    from effitrain.export.formats import FORMATS

    suffix = FORMATS[fmt].suffix
    default = output is None
    if output is None:  # RUN_DIR/artifacts/ is made when the export is written, after every check
        output = run_dir / "artifacts" / (f"{stage}{suffix}" if suffix else f"{stage}_{fmt}")
    if suffix and output.suffix == suffix:
        stem = output.with_suffix("")
        target = Target(output, stem.with_name(stem.name + ".export.json"), stem.with_name(stem.name + ".tokenizer") if text else None)
        for path in target.paths():
            if path.exists():
                raise ConfigError(f"-o {output}: {path} already exists; effitrain never overwrites (allowed: a new path)")
    elif output.suffix:
        raise ConfigError(f"-o {output}: --format {fmt} writes {'*' + suffix + ' or a folder' if suffix else 'a folder'} (allowed: "
                          f"{'a path ending in ' + suffix + ', or ' if suffix else ''}a new or empty folder)")
    else:
        if output.exists() and not (output.is_dir() and not any(output.iterdir())):
            raise ConfigError(f"-o {output}: already holds files; effitrain never overwrites (allowed: a new or empty folder)")
        target = Target(output / f"model{suffix}" if suffix else output, output / "export.json",
                        (output / "tokenizer") if text and suffix else None, folder=output)
    if not default and not output.parent.is_dir():
        raise ConfigError(f"-o {output}: folder {output.parent} does not exist")
    return target


def check_runtime(fmt: str) -> None:
    """Refuse a format whose runtime packages are not installed."""
    missing = [name for name in RUNTIME_PACKAGES[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format {fmt} needs {', '.join(missing)}, which is not installed (pip install -e \".[deploy]\")")


def refuse_unfit(model: Any, fmt: str, where: str) -> None:
    """One line naming why `model` cannot take `fmt` and the formats it can."""
    from effitrain.export.formats import FORMATS

    reason = FORMATS[fmt].refusal(model)
    if reason:
        fits = [name for name in FORMAT_NAMES if FORMATS[name].refusal(model) is None]
        raise ConfigError(f"{where}: cannot export as {fmt}: {reason} (allowed for this model: {', '.join(fits) or 'none'})")


def test_inputs(data: Any, task: Any) -> tuple[dict[str, Any], list[str], bool]:
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


def _example(arrays: dict[str, Any], keyed: bool, rows: int) -> Any:
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


def export_run(target_text: str, fmt: Optional[str], output: Optional[Path], min_agreement: float) -> tuple[Path, dict[str, Any]]:
    """Export a completed stage of a run and prove its parity.

    Args:
        target_text: RUN_DIR or RUN_DIR:STAGE (default: the last completed stage).
        fmt: onnx | torchscript | hf | safetensors (default: onnx where the model has an ONNX graph).
        output: artifact path (file or folder); default RUN_DIR/artifacts/STAGE.SUFFIX.
        min_agreement: the least fraction of test predictions that must equal the stage's saved ones.

    Returns:
        (the artifact's path, the export record written beside it).

    Raises:
        ConfigError: bad input (one line); nothing is left behind.
    """
    from omegaconf import OmegaConf

    from effitrain.predictions import run_predictions
    from effitrain.runs import completed_stage

    run_dir, stage = parse_target(target_text)
    if fmt is not None:
        require_choice("--format", fmt, FORMAT_NAMES)
    require(0.0 <= min_agreement <= 1.0, "--min-agreement", min_agreement, "a fraction in [0, 1]")
    stage = completed_stage(run_dir, stage)
    saved = run_predictions(run_dir, stage)[1]
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    text = "tokenizer" in (config.get("data") or {})
    if fmt is not None:
        check_runtime(fmt)
        plan_target(run_dir, stage, fmt, output, text)
    from effitrain.export.formats import FORMATS, default_format
    from effitrain.pipeline import build_task
    from effitrain.runs import load_run_model

    model, data = load_run_model(run_dir, stage)
    where = f"{run_dir}:{stage}"
    fmt = fmt or default_format(model)
    check_runtime(fmt)
    refuse_unfit(model, fmt, where)
    target = plan_target(run_dir, stage, fmt, output, text)
    task = build_task(config.task)
    arrays, names, keyed = test_inputs(data, task)
    measure = config.measure
    tokenizer = None
    if text and FORMATS[fmt].suffix != ".safetensors":
        from effitrain.models.hf import load_tokenizer

        tokenizer = load_tokenizer(str(config.data.tokenizer), bool(config.data.get("offline", True)))
    model = model.cpu().eval()
    (target.folder or target.artifact).parent.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=(target.folder or target.artifact).parent, prefix=f".{(target.folder or target.artifact).name}.partial-"))
    try:
        staged = target.staged(staging)
        try:
            facts = FORMATS[fmt].write(model, _example(arrays, keyed, 2), staged.artifact)
        except Exception as error:  # the exporter or tracer meets something it cannot translate
            others = [name for name in FORMAT_NAMES if name != fmt and FORMATS[name].refusal(model) is None]
            first = next((line for line in str(error).splitlines() if line.strip()), "")[:200]
            raise ConfigError(f"{where}: the {fmt} exporter failed ({type(error).__name__}: {first}) (other formats for this model: {', '.join(others)})") from None
        if tokenizer is not None:  # a folder artifact holds it; a file artifact gets it beside
            tokenizer.save_pretrained(str(staged.tokenizer or staged.artifact))
        record = _parity(model, fmt, staged, arrays, names, keyed, saved, measure, data, task)
        record.update(facts)
        record.update(stage=stage, run=str(run_dir.resolve()), format=fmt, artifact=target.artifact.name, min_agreement=min_agreement)
        if record["agreement"] < min_agreement:
            raise ConfigError(f"export: {fmt} predictions agree with stage {stage}'s own on {record['agreement']:.4f} of "
                              f"{record['examples']} test examples, below --min-agreement {min_agreement}; nothing written")
        staged.record.write_text(json.dumps(record, indent=2) + "\n")
        _readable(staging)
        target.publish(staged)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target.artifact, record


def _readable(folder: Path) -> None:
    """Staged files get the user's usual permissions (mkdtemp/mkstemp make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _bytes(path: Path) -> dict[str, int]:
    if path.is_dir():
        return {str(file.relative_to(path)): file.stat().st_size for file in sorted(path.rglob("*")) if file.is_file()}
    return {path.name: path.stat().st_size}


def _parity(model: Any, fmt: str, staged: Target, arrays: dict[str, Any], names: list[str], keyed: bool, saved: dict[str, list[int]],
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
    latency = latency_ms(rebuilt, _example(arrays, keyed, int(measure.batch_size)), precision, int(measure.warmup), int(measure.repeats), measure.get("threads"))
    return {"predictions": predictions, "latency_ms": latency, "latency_batch": int(measure.batch_size), "tensors_identical": True,
            "runtime": f"{alone['runtime']} alone (tensor digests); predictions from its weights loaded into the rebuilt module"}
