"""Trainer overhead: effitrain's training throughput vs a minimal hand-written PyTorch loop.

Same model (digits CNN), data, batch size, optimizer and thread count; the two loops are
interleaved round by round in one process so machine noise hits both alike. Prints samples/s
and the median over rounds of each round's ratio effitrain / hand loop (the two runs of a
round are adjacent in time, so the ratio is less exposed to drift than the medians are) for:
  - training steps only (the hot loop: what the target >= 0.97 is about), and
  - whole epochs as effitrain runs them (plus per-epoch validation and an atomic checkpoint).

Run: python benchmarks/trainer_overhead.py [--rounds 5] [--epochs 3] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effitrain.data.digits import build_digits
from effitrain.models.cnn import SmallCNN
from effitrain.precision import build_precision
from effitrain.runlog import RunLogger
from effitrain.trainer import Hook, Trainer, TrainerSettings


class StepTimer(Hook):
    """Times each epoch's training steps (first step's start to last step's end), excluding validation."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.started = time.perf_counter()

    def after_step(self, trainer: Trainer) -> None:
        self.last = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer, metrics: dict) -> None:
        self.seconds += self.last - self.started


def hand_loop(model: torch.nn.Module, loader, epochs: int, lr: float) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    started = time.perf_counter()
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for inputs, labels in loader:
            loss = F.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def effitrain_loop(model: torch.nn.Module, data, epochs: int, lr: float, folder: Path, tensorboard: bool = True) -> tuple[float, float]:
    timer = StepTimer()
    trainer = Trainer(
        TrainerSettings(max_epochs=epochs, progress="off", scheduler="constant", restore_best=False),
        lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
        build_precision("fp32", torch.device("cpu")),
        RunLogger(folder, tensorboard=tensorboard),
        "bench",
        folder / "checkpoints",
        hooks=[timer],
    )
    started = time.perf_counter()
    trainer.fit(model, data.train, data.val)
    trainer.logger.close()
    return timer.seconds, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-tensorboard", action="store_true", help="metrics.jsonl only")
    args = parser.parse_args()
    data = build_digits(batch_size=args.batch_size)
    samples = len(data.train.dataset) * args.epochs
    hand, steps, whole = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for which in ("hand", "effitrain") if round_index % 2 == 0 else ("effitrain", "hand"):
                torch.manual_seed(round_index)
                model = SmallCNN((1, 8, 8), 10)
                if which == "hand":
                    hand.append(samples / hand_loop(model, data.train, args.epochs, 3e-3))
                else:
                    step_seconds, fit_seconds = effitrain_loop(
                        model, data, args.epochs, 3e-3, Path(tmp) / f"r{round_index}", tensorboard=not args.no_tensorboard
                    )
                    steps.append(samples / step_seconds)
                    whole.append(samples / fit_seconds)
    print(f"digits CNN, batch {args.batch_size}, {args.epochs} epochs x {args.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads (median samples/s)")
    print(f"  hand-written loop          {statistics.median(hand):10,.0f}")
    step_ratio = statistics.median(e / h for e, h in zip(steps, hand))
    whole_ratio = statistics.median(e / h for e, h in zip(whole, hand))
    print(f"  effitrain training steps   {statistics.median(steps):10,.0f}   ratio {step_ratio:.3f}")
    print(f"  effitrain whole epochs     {statistics.median(whole):10,.0f}   ratio {whole_ratio:.3f}"
          "   (adds validation + checkpoint each epoch)")


if __name__ == "__main__":
    main()
