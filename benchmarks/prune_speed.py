"""Pruning: what a pruned model gains in size and CPU latency, measured in one run.

Models (the wide digits CNN of the pruning recipes, random weights: speed and size do not
depend on training): dense; 50% and 75% of channels removed (structured, Torch-Pruning,
physically smaller tensors); 90% of weights zeroed (unstructured masks, tensors still dense).
Latency is the median over interleaved rounds of each model's median forward time on the
same batch, so machine drift hits all models alike. Size is the saved safetensors file.

Unstructured sparsity does not speed up dense kernels: the zeros are still multiplied.
Shrinking it on disk or in time needs sparse storage/kernels (not used here).

Run: python benchmarks/prune_speed.py [--rounds 15] [--batch-size 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from effitrain.checkpoint import save_weights
from effitrain.models.cnn import SmallCNN
from effitrain.prune.masks import apply_masks, magnitude_masks, prunable, saliency_scores
from effitrain.prune.structured import prune_channels


def median_forward_ms(model: torch.nn.Module, inputs: torch.Tensor, repeats: int) -> float:
    timings = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            model(inputs)
            timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = SmallCNN((1, 8, 8), 10, channels=(64, 128), hidden=256).eval()
    inputs = torch.randn(args.batch_size, 1, 8, 8)
    models = {"dense": dense}
    for share in (0.5, 0.75):
        model = copy.deepcopy(dense)
        prune_channels(model, inputs[:2], share, {name: None for name in prunable(model)}, "l1", "uniform", "bench")
        models[f"structured {share:.0%}"] = model.eval()
    sparse = copy.deepcopy(dense)
    names = list(prunable(sparse))
    apply_masks(sparse, magnitude_masks(saliency_scores(sparse, "l1", names), 0.9, {name: None for name in names}, "global"))
    models["unstructured 90%"] = sparse
    latency: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        median_forward_ms(model, inputs, 5)  # warm-up
    for _ in range(args.rounds):
        for name, model in models.items():
            latency[name].append(median_forward_ms(model, inputs, args.repeats))
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for name, model in models.items():
            path = Path(tmp) / f"{name.replace(' ', '_').replace('%', '')}.safetensors"
            save_weights(model, path)
            sizes[name] = path.stat().st_size
    print(f"wide digits CNN, batch {args.batch_size}, {args.threads} threads, {args.rounds} interleaved rounds")
    print(f"{'model':20}{'params':>10}{'nonzero':>10}{'size KiB':>10}{'smaller x':>11}{'latency ms':>12}{'faster x':>10}")
    base = statistics.median(latency["dense"])
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        ratios = [d / m for d, m in zip(latency["dense"], latency[name])]
        print(f"{name:20}{params:10,}{nonzero:10,}{sizes[name] / 1024:10.1f}{sizes['dense'] / sizes[name]:11.2f}"
              f"{statistics.median(latency[name]):12.3f}{statistics.median(ratios):10.2f}")
    print(f"(dense median {base:.3f} ms; 'faster x' is the median of per-round ratios)")


if __name__ == "__main__":
    main()
