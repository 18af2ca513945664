"""`effitrain export RUN_DIR[:STAGE]`: a stage's model as an artifact that loads without
effitrain (ONNX, TorchScript, a Hugging Face folder, or plain safetensors weights), with parity
proven on the run's test split in a fresh interpreter that never imports effitrain.

Everything is checked before anything is written; the artifact is built in a hidden staging
folder beside the target and moved into place only after its parity check passed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from effitrain.errors import ConfigError, require, require_choice
from effitrain.export.formats import FORMATS, default_format
from effitrain.export.parity import check_parity, example_rows, split_inputs
from effitrain.export.target import make_readable, parse_target, plan_target

FORMAT_NAMES = tuple(FORMATS)


def check_runtime(fmt: str) -> None:
    """Refuse a format whose runtime packages are not installed."""
    missing = [name for name in FORMATS[fmt].packages if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format {fmt} needs {', '.join(missing)}, which is not installed (pip install -e \".[deploy]\")")


def refuse_unfit(model: Any, fmt: str, where: str) -> None:
    """One line naming why `model` cannot take `fmt` and the formats it can."""
    reason = FORMATS[fmt].refusal(model)
    if reason:
        fits = [name for name in FORMAT_NAMES if FORMATS[name].refusal(model) is None]
        raise ConfigError(f"{where}: cannot export as {fmt}: {reason} (allowed for this model: {', '.join(fits) or 'none'})")


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
    from effitrain.pipeline import build_task
    from effitrain.runs import load_run_model

    model, data = load_run_model(run_dir, stage)
    where = f"{run_dir}:{stage}"
    chosen = fmt is not None
    fmt = fmt or default_format(model)
    check_runtime(fmt)
    refuse_unfit(model, fmt, where)
    target = plan_target(run_dir, stage, fmt, output, text, chosen)
    task = build_task(config.task)
    arrays, names, keyed = split_inputs(data, task)
    measure = config.measure
    tokenizer = None
    if text and fmt != "safetensors":  # plain weights are for users who rebuild the module and its inputs themselves
        from effitrain.models.hf import load_tokenizer

        tokenizer = load_tokenizer(str(config.data.tokenizer), bool(config.data.get("offline", True)))
    model = model.cpu().eval()
    top = target.folder or target.artifact  # what appears in the output folder when it is done
    top.parent.mkdir(exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=top.parent, prefix=f".{top.name}.partial-"))
    try:
        staged = target.staged(staging)
        try:
            facts = FORMATS[fmt].write(model, example_rows(arrays, keyed, 2), staged.artifact)
        except Exception as error:  # the exporter or tracer meets something it cannot translate
            others = [name for name in FORMAT_NAMES if name != fmt and FORMATS[name].refusal(model) is None]
            first = next((line for line in str(error).splitlines() if line.strip()), "")[:200]
            raise ConfigError(f"{where}: the {fmt} exporter failed ({type(error).__name__}: {first}) (other formats for this model: {', '.join(others)})") from None
        if tokenizer is not None:  # a folder artifact holds it; a file artifact gets it beside
            FORMATS[fmt].save_tokenizer(model, tokenizer, staged.tokenizer or staged.artifact)
        record = check_parity(model, fmt, staged, FORMATS[fmt].parity_inputs(model, arrays), names, keyed, saved, measure, data, task)
        record.update(facts)
        record.update(stage=stage, run=str(run_dir.resolve()), format=fmt, artifact=target.artifact.name, min_agreement=min_agreement)
        if record["agreement"] < min_agreement:
            raise ConfigError(f"export: {fmt} predictions agree with stage {stage}'s own on {record['agreement']:.4f} of "
                              f"{record['examples']} test examples, below --min-agreement {min_agreement}; nothing written")
        staged.record.write_text(json.dumps(record, indent=2) + "\n")
        make_readable(staging)
        target.publish(staged)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target.artifact, record


