"""Dense vs CSR at 50/75/90/95% unstructured sparsity, by the code path of the `sparsify` stage
(effitrain.prune.kernels, effitrain.retime.interleaved): both kernels timed in alternating
rounds in one process, medians. Prints each ratio dense / csr and, per shape, the crossover:
the lowest sparsity at which CSR is at least 5% faster.

- Linear layers of the BERT student's shapes (MiniLM: 384 -> 384 attention projections,
  384 -> 1536 and 1536 -> 384 FFN) on its measurement batch (32 articles x 64 tokens = 2,048 rows).
- 1x1 convolutions of MobileNet v1 at 224x224, one image (the setting of Fast Sparse ConvNets,
  Elsen et al. 2020), against torch's dense Conv2d; with --images N > 1 the faster of the two
  CSR layouts (columns, per image) is shown and named.
- With --device cuda (a GPU from Ampere on): the same Linear shapes pruned 2:4 (50%), dense vs
  torch's 2:4 semi-structured kernels (effitrain.prune.kernels.SemiStructuredLinear) in --dtype.

Run: python benchmarks/sparse_speed.py [--rows 2048] [--images 1] [--rounds 7] [--passes 5] [--threads N] [--only linear|conv]
     python benchmarks/sparse_speed.py --device cuda [--dtype fp16|bf16|fp32] [--rows 2048]
"""

from __future__ import annotations

import argparse
import warnings
from typing import Callable

import torch
from torch import nn

from effitrain.prune.kernels import MIN_SPEEDUP, SEMI_STRUCTURED, SemiStructuredLinear, sparse_kernel
from effitrain.prune.masks import nm_masks
from effitrain.retime import interleaved, synchronizer

LINEARS = [(384, 384, "attention q/k/v/o"), (384, 1536, "FFN up"), (1536, 384, "FFN down")]
CONVS = [(64, 128, 56), (128, 256, 28), (256, 512, 14), (512, 512, 14), (512, 1024, 7), (1024, 1024, 7)]  # in, out, pixels per side
SPARSITIES = [0.5, 0.75, 0.9, 0.95]


def compare(title: str, layer_of: Callable[[], nn.Module], inputs: torch.Tensor, args: argparse.Namespace) -> None:
    """Time one shape at every sparsity and print its rows and crossover: dense against the
    fastest CSR layout (a convolution on several images has two: columns and per image)."""
    crossover = None
    for sparsity in SPARSITIES:
        layer = layer_of()
        with torch.no_grad():
            layer.weight[torch.rand_like(layer.weight) < sparsity] = 0
        layouts = ["csr", "csr per image"] if isinstance(layer, nn.Conv2d) and inputs.shape[0] > 1 else ["csr"]
        runners = {"dense": layer, **{kernel: sparse_kernel(layer, kernel) for kernel in layouts}}
        with torch.no_grad():
            for kernel in layouts:
                assert torch.allclose(layer(inputs), runners[kernel](inputs), atol=1e-4)
            times = interleaved({kernel: (lambda run=run: run(inputs)) for kernel, run in runners.items()}, args.rounds, args.passes, 2)
        best = min(layouts, key=times.__getitem__)
        ratio = times["dense"] / times[best]
        if crossover is None and ratio >= MIN_SPEEDUP:
            crossover = sparsity
        print(f"{title:34}{sparsity:9.0%}{times['dense']:10.2f}{times[best]:9.2f}{ratio:11.2f}  {best if len(layouts) > 1 else ''}")
    print("  crossover: " + (f"csr >= {MIN_SPEEDUP:.2f}x from {crossover:.0%} zeros" if crossover else "csr never 5% faster up to 95%"))


def two_four_on_cuda(args: argparse.Namespace) -> None:
    """Dense vs each 2:4 kernel that takes --dtype, on 2:4-pruned Linear layers of the BERT shapes."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.dtype}, {args.rows} rows, {args.rounds} interleaved rounds x {args.passes} passes")
    kernels = [kernel for kernel, (_, dtypes) in SEMI_STRUCTURED.items() if dtype in dtypes]
    print(f"{'layer':28}{'dense ms':>10}" + "".join(f"{kernel:>16}{'x':>6}" for kernel in kernels))
    for in_features, out_features, title in LINEARS:
        layer = nn.Linear(in_features, out_features).to(device)
        with torch.no_grad():  # the 2 largest of every 4, as `granularity: nm` prunes
            layer.weight.mul_(nm_masks({"w": layer.weight.abs()}, 2, 4, "benchmark")["w"])
        inputs = torch.randn(args.rows, in_features, device=device, dtype=dtype)
        dense = nn.Linear(in_features, out_features).to(device, dtype)
        dense.load_state_dict(layer.state_dict())
        runners = {"dense": lambda: dense(inputs)}
        for kernel in kernels:
            sparse = SemiStructuredLinear(layer, kernel, dtype)
            with torch.no_grad():
                try:
                    assert torch.allclose(sparse(inputs).float(), dense(inputs).float(), rtol=1e-2, atol=1e-2)
                except (RuntimeError, NotImplementedError) as error:
                    print(f"  {kernel}: {' '.join(str(error).split())[:160]}")
                    continue
            runners[kernel] = lambda sparse=sparse: sparse(inputs)
        with torch.no_grad():
            times = interleaved(runners, args.rounds, args.passes, 5, synchronizer(device))
        cells = "".join(f"{times[k]:16.3f}{times['dense'] / times[k]:6.2f}" if k in times else f"{'failed':>16}{'':6}" for k in kernels)
        print(f"{f'{in_features}->{out_features} {title}':28}{times['dense']:10.3f}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048, help="rows into each Linear layer")
    parser.add_argument("--images", type=int, default=1, help="images into each 1x1 convolution")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=["linear", "conv"], default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="--device cuda: the 2:4 kernels' dtype")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda: torch sees no CUDA GPU here (allowed: --device cpu)")
        two_four_on_cuda(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU fp32, {args.rounds} interleaved rounds x {args.passes} passes")
    header = f"{'sparsity':>9}{'dense ms':>10}{'csr ms':>9}{'dense/csr':>11}"
    if args.only != "conv":
        print(f"\nLinear, {args.rows} rows\n{'layer':34}{header}")
        for in_features, out_features, title in LINEARS:
            compare(f"{in_features}->{out_features} {title}", lambda: nn.Linear(in_features, out_features), torch.randn(args.rows, in_features), args)
    if args.only != "linear":
        print(f"\n1x1 Conv2d, {args.images} image(s)\n{'layer':34}{header}")
        for in_channels, out_channels, side in CONVS:
            compare(f"{in_channels}->{out_channels} at {side}x{side}", lambda: nn.Conv2d(in_channels, out_channels, 1, bias=False),
                    torch.randn(args.images, in_channels, side, side), args)


if __name__ == "__main__":
    main()
