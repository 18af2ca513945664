"""Dense vs CSR Linear layers at 50/75/90/95% unstructured sparsity, on the BERT student's layer
shapes (MiniLM: 384 -> 384 attention projections, 384 -> 1536 and 1536 -> 384 FFN) and its
measurement batch (32 articles x 64 tokens = 2,048 rows), by the code path of the `sparsify`
stage (effitrain.prune.kernels.SparseLinear, effitrain.retime.interleaved): both kernels timed
in alternating rounds in one process, medians. Prints each ratio dense / csr and, per shape,
the crossover: the lowest sparsity at which CSR is at least 5% faster.

Run: python benchmarks/sparse_speed.py [--rows 2048] [--rounds 7] [--passes 5] [--threads N]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from effitrain.prune.kernels import MIN_SPEEDUP, SparseLinear
from effitrain.retime import interleaved

SHAPES = [(384, 384, "attention q/k/v/o"), (384, 1536, "FFN up"), (1536, 384, "FFN down")]
SPARSITIES = [0.5, 0.75, 0.9, 0.95]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, {args.rows} rows, {args.rounds} interleaved rounds x {args.passes} passes")
    print(f"{'layer':28}{'sparsity':>9}{'dense ms':>10}{'csr ms':>9}{'dense/csr':>11}")
    for in_features, out_features, title in SHAPES:
        crossover = None
        inputs = torch.randn(args.rows, in_features)
        for sparsity in SPARSITIES:
            layer = nn.Linear(in_features, out_features)
            with torch.no_grad():
                layer.weight[torch.rand_like(layer.weight) < sparsity] = 0
            sparse = SparseLinear(layer)
            with torch.no_grad():
                assert torch.allclose(layer(inputs), sparse(inputs), atol=1e-4)
                times = interleaved({"dense": lambda: layer(inputs), "csr": lambda: sparse(inputs)}, args.rounds, args.passes, 2)
            ratio = times["dense"] / times["csr"]
            if crossover is None and ratio >= MIN_SPEEDUP:
                crossover = sparsity
            name = f"{in_features}->{out_features} {title}"
            print(f"{name:28}{sparsity:9.0%}{times['dense']:10.2f}{times['csr']:9.2f}{ratio:11.2f}")
        print(f"  crossover ({in_features}->{out_features}): " + (f"csr >= {MIN_SPEEDUP:.2f}x from {crossover:.0%} zeros" if crossover else "csr never 5% faster up to 95%"))


if __name__ == "__main__":
    main()
