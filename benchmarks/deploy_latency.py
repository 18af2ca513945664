"""Deployment latency, measured side by side: what a user gets from effitrain's exports against
what they would do without effitrain.

    python benchmarks/deploy_latency.py RUN_DIR [--teacher STAGE] [--rounds 5] [--repeats 20]

Timed interleaved in one process (round-robin, several rounds, median of round medians), on the
run's measurement batch (measure.batch_size test inputs):

- the teacher in PyTorch fp32 (the starting point);
- the teacher exported to ONNX and quantized by ONNX Runtime's own dynamic int8
  (`onnxruntime.quantization.quantize_dynamic`, what a user does without effitrain);
- every stage of the run exported by `effitrain export`'s ONNX path, in ONNX Runtime.

Prints test accuracy, file size and latency, with ratios against the teacher in PyTorch and
against ONNX Runtime's int8 teacher. Needs the deploy extra (pip install -e ".[deploy]").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def accuracy(run: Callable[[dict[str, Any]], Any], arrays: dict[str, np.ndarray], labels: list[int], batch: int) -> float:
    count = len(labels)
    predicted: list[int] = []
    for start in range(0, count, batch):
        predicted += np.asarray(run({name: value[start:start + batch] for name, value in arrays.items()})).argmax(-1).tolist()
    return sum(p == y for p, y in zip(predicted, labels)) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--teacher", default=None, help="the stage that is the starting point (default: the first)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    from omegaconf import OmegaConf
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from effitrain.export.parity import split_inputs
    from effitrain.export.formats import FORMATS
    from effitrain.export.ort import session
    from effitrain.retime import interleaved
    from effitrain.pipeline import build_task
    from effitrain.predictions import run_predictions
    from effitrain.runfiles import read_summary
    from effitrain.runs import load_run_model

    stages = [row["name"] for row in read_summary(args.run_dir)["stages"]]
    teacher = args.teacher or stages[0]
    config = OmegaConf.load(args.run_dir / ".hydra" / "config.yaml")
    task = build_task(config.task)
    labels = run_predictions(args.run_dir, teacher)[1]["labels"]
    threads = config.measure.get("threads")
    if threads:
        torch.set_num_threads(threads)
    candidates: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        arrays = None
        for stage in stages:
            model, data = load_run_model(args.run_dir, stage)
            model = model.cpu().eval()
            if arrays is None:
                arrays, names, keyed = split_inputs(data, task)
                timed = {name: value[: config.measure.batch_size] for name, value in arrays.items()}
                batch = int(data.test.batch_size or 64)
            example = {name: torch.from_numpy(value[:2]) for name, value in arrays.items()}
            example = example if keyed else example[names[0]]
            if stage == teacher:
                def torch_run(inputs: dict[str, Any], model: Any = model) -> Any:
                    tensors = [torch.from_numpy(inputs[name]) for name in names]
                    output = model(**dict(zip(names, tensors))) if keyed else model(tensors[0])
                    return getattr(output, "logits", output).numpy()

                state = Path(scratch) / "teacher_state.pt"
                torch.save(model.state_dict(), state)
                candidates[f"{teacher} (PyTorch fp32)"] = {"run": torch_run, "bytes": state.stat().st_size}
            path = Path(scratch) / f"{stage}.onnx"
            reason = FORMATS["onnx"].refusal(model)
            if reason:
                print(f"skipped {stage}: {reason}")
                continue
            FORMATS["onnx"].write(model, example, path)
            loaded = session(path, threads, cuda=False)
            candidates[f"{stage} (effitrain, ONNX Runtime)"] = {"run": lambda inputs, s=loaded: s.run(["logits"], inputs)[0], "bytes": path.stat().st_size}
            if stage == teacher:
                quantized = Path(scratch) / f"{stage}.ort_int8.onnx"
                quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
                int8 = session(quantized, threads, cuda=False)
                candidates[f"{teacher} (ONNX Runtime dynamic int8)"] = {"run": lambda inputs, s=int8: s.run(["logits"], inputs)[0], "bytes": quantized.stat().st_size}
        for entry in candidates.values():
            entry["accuracy"] = accuracy(entry["run"], arrays, labels, batch)
        runners = {name: (lambda entry=entry: entry["run"](timed)) for name, entry in candidates.items()}
        latency = interleaved(runners, args.rounds, args.repeats, warmup=3)  # every candidate once per round
    base, ort_int8 = f"{teacher} (PyTorch fp32)", f"{teacher} (ONNX Runtime dynamic int8)"
    print(f"{args.run_dir}: batch of {len(next(iter(timed.values())))}, {args.rounds} interleaved rounds x {args.repeats} passes, "
          f"{torch.get_num_threads()} torch threads, {time.strftime('%Y-%m-%d %H:%M')}")
    header = f"{'model':<44} {'accuracy':>8} {'acc/teacher':>11} {'MB':>8} {'ms':>9} {'faster x':>9} {'smaller x':>9} {'vs ORT int8 teacher':>19}"
    print(header)
    print("-" * len(header))
    for name, entry in candidates.items():
        print(f"{name:<44} {entry['accuracy']:>8.4f} {entry['accuracy'] / candidates[base]['accuracy']:>11.3f} {entry['bytes'] / 1e6:>8.2f} "
              f"{latency[name]:>9.3f} {latency[base] / latency[name]:>9.2f} {candidates[base]['bytes'] / entry['bytes']:>9.2f} "
              f"{latency[ort_int8] / latency[name]:>18.2f}x")


if __name__ == "__main__":
    main()
