"""Data-parallel scaling: training samples per second through effitrain's Trainer on 1 process
and on N (`trainer.devices`), interleaved round by round so machine noise hits both alike.

Each run is the real command (`effitrain run recipe=baseline ... trainer.devices=N`), so the
figure includes everything a user's run pays per step: the split of each global batch, DDP's
gradient all-reduce, the all-reduced loss and the sharded validation. Throughput is the
trainer's own `samples_per_second` of each epoch (metrics.jsonl), the first epoch left out
(warm-up); the table shows the median over epochs and rounds, and the ratio N / 1.

On a CPU the N processes share the same cores a lone process used (each gets cores / N
threads), so the ideal is 1x, not Nx: data parallelism on one CPU only pays when a lone process
cannot use every core. On a machine with N GPUs (`device=cuda`) each process has its own.

Run: python benchmarks/ddp_scaling.py [--devices 2] [--rounds 3] [--epochs 4] [--width 256] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run(folder: Path, devices: int, args: argparse.Namespace) -> list[float]:
    """One run; the trainer's samples/s of each epoch after the first."""
    command = [sys.executable, "-m", "effitrain", "run", "recipe=baseline", "~stage.evaluate", "data=synthetic",
               f"data.num_samples={args.samples}", f"data.batch_size={args.batch_size}", "model=mlp",
               f"model.hidden=[{args.width},{args.width}]", "model.dropout=0", f"trainer.max_epochs={args.epochs}",
               f"trainer.devices={devices}", f"device={args.device}", "measure.repeats=10", "measure.final_retime=false",
               "report=false", f"hydra.run.dir={folder}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"run failed ({' '.join(command)}):\n{result.stderr[-2000:]}")
    epochs = [record for record in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "epoch" in record]
    return [record["samples_per_second"] for record in epochs[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="processes to compare with one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width", type=int, default=256, help="hidden width of the 2-layer MLP")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one process per GPU)")
    args = parser.parse_args()
    figures: dict[int, list[float]] = {1: [], args.devices: []}
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(args.rounds):
            order = (1, args.devices) if round_index % 2 == 0 else (args.devices, 1)
            for devices in order:
                figures[devices] += run(Path(scratch) / f"r{round_index}_d{devices}", devices, args)
    one, many = statistics.median(figures[1]), statistics.median(figures[args.devices])
    print(f"MLP {args.width}x{args.width} on synthetic data, global batch {args.batch_size}, {args.samples} examples, "
          f"{args.epochs - 1} timed epochs x {args.rounds} interleaved rounds, device {args.device}")
    print(f"{'processes':>10}{'samples/s (median)':>22}{'min':>12}{'max':>12}")
    for devices in (1, args.devices):
        values = figures[devices]
        print(f"{devices:>10}{statistics.median(values):>22,.0f}{min(values):>12,.0f}{max(values):>12,.0f}")
    print(f"ratio {args.devices} / 1 processes: {many / one:.2f}x")


if __name__ == "__main__":
    main()
