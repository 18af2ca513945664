"""Training throughput per precision policy (fp32, bf16, fp16 with loss scaling) through the
effitrain Trainer, on the run device, policies interleaved round by round in one process.

Prints samples/s per policy and its ratio to fp32. On a CPU, fp16 is skipped (no CPU training
path) and bf16 is expected to be slower unless the CPU has native bf16.

Run: python benchmarks/precision_throughput.py [--model resnet18] [--batch-size 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
from functools import partial
import statistics
import tempfile
import time
from pathlib import Path

import torch

from effitrain.data.synthetic import build_synthetic
from effitrain.errors import ConfigError
from effitrain.models.zoo import torchvision_model
from effitrain.precision import build_precision, resolve_device
from effitrain.runlog import RunLogger
from effitrain.trainer import Trainer, TrainerConfig
from effitrain.trainer.schedule import constant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device("auto")
    data = build_synthetic(num_samples=args.samples, num_classes=10, input_shape=(3, 32, 32), batch_size=args.batch_size,
                           val_fraction=0.05, test_fraction=0.05)
    policies = []
    for name in ("fp32", "bf16", "fp16"):
        try:
            build_precision(name, device)
            policies.append(name)
        except ConfigError as error:
            print(f"skip {name}: {error}")
    speeds: dict[str, list[float]] = {name: [] for name in policies}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds + 1):  # round 0 warms up kernels and is discarded
            for name in policies:
                torch.manual_seed(0)
                model = torchvision_model(args.model, num_classes=10, input_shape=(3, 32, 32))
                folder = Path(tmp) / f"{name}{round_index}"
                trainer = Trainer(
                    TrainerConfig.with_defaults(max_epochs=1, progress="off", restore_best=False),
                    lambda params: torch.optim.AdamW(params, lr=1e-3), partial(constant, warmup_steps=0, min_lr_ratio=1.0),
                    build_precision(name, device), RunLogger(folder, tensorboard=False), name, folder / "ckpt",
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                trainer.fit(model, data.train, data.val)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if round_index:
                    speeds[name].append(len(data.train.dataset) / (time.perf_counter() - started))
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model}, batch {args.batch_size}, 3x32x32, 1 epoch x {args.rounds} rounds on {label} (median samples/s, incl. validation)")
    base = statistics.median(speeds["fp32"])
    for name in policies:
        speed = statistics.median(speeds[name])
        print(f"  {name:5s} {speed:12,.0f}   x{speed / base:.2f} vs fp32")


if __name__ == "__main__":
    main()
