"""Quantization backends: fp32 vs int8 latency and size, measured in one run on this device.

Models: the digits CNN (batch 256) and the BERT student of distill_bert (MiniLM-L6 keeping
every 2nd layer, batch 32 x 64 tokens; weights untrained: speed and size do not depend on them).
Backends: effitrain's `weight_only` int8 (packed integers, float compute), `auto` (x86/fbgemm
dynamic int8 kernels for Linear layers + weight-only int8 for the rest), and, when torchao is
installed, torchao's eager Int8WeightOnly and Int8DynamicActivationInt8Weight configs.
Latency: median over interleaved rounds of each model's median forward time. Size: bytes of
the saved state dict (safetensors for effitrain's layers; torch.save for torchao's tensor subclasses).

Run: python benchmarks/quant_speed.py [--rounds 7] [--threads 2] [--skip-bert]
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch

from effitrain.batch import forward
from effitrain.checkpoint import save_weights
from effitrain.layers import select_layers
from effitrain.quant import backends
from effitrain.quant.backends import QUANTIZABLE, QuantSpec


def median_ms(model: torch.nn.Module, inputs, repeats: int) -> float:
    timings = []
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            forward(model, inputs)
            timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def size_bytes(model: torch.nn.Module) -> int:
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.safetensors"
            save_weights(model, path)
            return path.stat().st_size
    except Exception:  # torchao tensor subclasses: not plain tensors
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return len(buffer.getvalue())


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    cpu = torch.device("cpu")
    found = {"fp32": model}
    for backend in ("weight_only", "auto"):
        quantized = copy.deepcopy(model)
        spec = QuantSpec(8, "symmetric", per_channel=True)
        steps = backends.plan(backend, quantized, select_layers(quantized, [], "bench", QUANTIZABLE, "quantize"), cpu, spec, "bench")
        quantized = backends.convert(quantized, steps, spec, None)
        found[f"int8 {backend}"] = quantized
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return found
    for label, config in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                          ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig())):
        quantized = copy.deepcopy(model)
        quantize_(quantized, config)
        found[label] = quantized
    return found


def report(title: str, model: torch.nn.Module, inputs, rounds: int, repeats: int) -> None:
    models = variants(model.eval())
    for candidate in models.values():
        median_ms(candidate, inputs, 2)
    timings: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, candidate in models.items():
            timings[name].append(median_ms(candidate, inputs, repeats))
    sizes = {name: size_bytes(candidate) for name, candidate in models.items()}
    print(title)
    print(f"  {'backend':28}{'size KiB':>12}{'smaller x':>11}{'latency ms':>12}{'faster x':>10}")
    for name in models:
        faster = statistics.median(f / t for f, t in zip(timings["fp32"], timings[name]))
        print(f"  {name:28}{sizes[name] / 1024:12.1f}{sizes['fp32'] / sizes[name]:11.2f}{statistics.median(timings[name]):12.3f}{faster:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-bert", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from effitrain.models.cnn import SmallCNN

    report("digits CNN, batch 256", SmallCNN((1, 8, 8), 10), torch.randn(256, 1, 8, 8), args.rounds, args.repeats * 3)
    if not args.skip_bert:
        from effitrain.distill.sources import derive_student
        from effitrain.models.hf import hf_classifier

        student = derive_student(hf_classifier("minilm", 5), 2, "bench")
        inputs = {"input_ids": torch.randint(1000, 30000, (32, 64)), "attention_mask": torch.ones(32, 64, dtype=torch.long)}
        report("BERT student (MiniLM-L6, every 2nd layer), batch 32 x 64 tokens", student, inputs, args.rounds, args.repeats)


if __name__ == "__main__":
    main()
