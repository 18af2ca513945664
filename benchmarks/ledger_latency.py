"""Re-measure a finished run's ledger latencies in one process, interleaved.

A run measures each stage's latency right after the stage, minutes apart; on a shared machine
other load can move one row by 2x. This reloads every completed stage's model from the run
folder (effitrain.runs.load_run_model) and times them in alternation on the same batch,
so the ratios to the first row are measured under the same conditions.

Run: python benchmarks/ledger_latency.py RUN_DIR [--rounds 7] [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from effitrain.batch import forward, move
from effitrain.runs import load_run_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    summary = json.loads((args.run_dir / "summary.json").read_text())
    names = [row["name"] for row in summary["stages"]]
    models, data = {}, None
    for name in names:
        models[name], data = load_run_model(args.run_dir, name)
    batch = int(summary["stages"][0]["metrics"].get("latency_batch", 32))
    inputs = move(data.example_batch(batch), torch.device("cpu"))
    timings: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for model in models.values():
            forward(model, inputs)
        for _ in range(args.rounds):
            for name, model in models.items():
                samples = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    forward(model, inputs)
                    samples.append((time.perf_counter() - started) * 1000)
                timings[name].append(statistics.median(samples))
    first = names[0]
    print(f"{args.run_dir} ({summary['recipe']}), batch {batch}, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"{'stage':12}{'ledger ms':>12}{'now ms':>10}{'faster x':>10}")
    for row in summary["stages"]:
        name = row["name"]
        faster = statistics.median(f / t for f, t in zip(timings[first], timings[name]))
        print(f"{name:12}{row['metrics']['latency_ms']:12.3f}{statistics.median(timings[name]):10.3f}{faster:10.2f}")


if __name__ == "__main__":
    main()
