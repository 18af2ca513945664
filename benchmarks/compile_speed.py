"""Training speed with torch.compile: eager vs compiled training steps, by the code path of
`trainer.compile: auto` (effitrain.trainer.compile.probe), on the digits CNN (quickstart's
teacher) and the distill_bert student (MiniLM, 3 layers, trimmed vocabulary).

One step = forward, loss, backward and the optimizer step on one fixed training batch. After a
warm-up and the compile (timed on its own), eager and compiled steps alternate round by round
in one process, so machine noise hits both alike; the figures are medians. It prints the ratio
eager / compiled per model and what `auto` would choose (compiled only when >= 5% faster).

Run: python benchmarks/compile_speed.py [--rounds 10] [--threads N] [--only cnn|bert]
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from effitrain.batch import forward
from effitrain.trainer.compile import MARGIN, probe


def training_step(model: nn.Module, inputs: Any, labels: torch.Tensor, lr: float) -> tuple[nn.Module, Callable[[nn.Module], None]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(module: nn.Module) -> None:
        loss = F.cross_entropy(forward(module, inputs), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model.train(), step


def digits_cnn() -> tuple[nn.Module, Callable[[nn.Module], None], str]:
    from effitrain.data.digits import build_digits
    from effitrain.models.cnn import SmallCNN

    data = build_digits(batch_size=64)
    inputs, labels = next(iter(data.train))
    torch.manual_seed(0)
    model, step = training_step(SmallCNN(data.input_shape, data.num_classes, channels=[32, 64], hidden=128, dropout=0.1), inputs, labels, 1e-3)
    return model, step, "digits CNN (quickstart teacher), batch 64"


def bert_student() -> tuple[nn.Module, Callable[[nn.Module], None], str]:
    from effitrain.compress.embeddings import token_ids, trim_vocabulary
    from effitrain.data.text import build_bbcnews
    from effitrain.distill.sources import derive_student
    from effitrain.models.hf import hf_classifier, load_tokenizer

    data = build_bbcnews("minilm", max_length=64, batch_size=32)
    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    student = derive_student(hf_classifier("minilm", 5), 2, "keep_every")
    kept = [*token_ids((inputs for inputs, _ in data.train), "vocab").tolist(), *tokenizer.all_special_ids]
    trim_vocabulary(student, kept, tokenizer.unk_token_id, "vocab")
    inputs, labels = next(iter(data.train))
    model, step = training_step(student, inputs, labels, 1e-4)
    return model, step, "distill_bert student (MiniLM 3 layers, trimmed vocab), batch 32 x 64 tokens"


CASES = {"cnn": digits_cnn, "bert": bert_student}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--only", choices=sorted(CASES), default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32; {args.rounds} interleaved rounds")
    for name in [args.only] if args.only else list(CASES):
        model, step, title = CASES[name]()
        started = time.perf_counter()
        measured, _ = probe(step, model, rounds=args.rounds)
        total = time.perf_counter() - started
        if measured.error is not None:
            print(f"{name}: {title}\n  torch.compile failed: {measured.error}")
            continue
        assert measured.compiled_ms is not None and measured.compile_s is not None
        ratio = measured.eager_ms / measured.compiled_ms
        verdict = "compiled" if measured.compiled_wins else f"eager (not {MARGIN:.0%} faster)"
        break_even = (measured.compile_s * 1000 / (measured.eager_ms - measured.compiled_ms)) if measured.compiled_ms < measured.eager_ms else None
        print(f"{name}: {title}")
        print(f"  eager    {measured.eager_ms:9.1f} ms/step")
        print(f"  compiled {measured.compiled_ms:9.1f} ms/step   compile {measured.compile_s:.1f} s")
        print(f"  eager / compiled = {ratio:.2f}x   auto chooses: {verdict}   "
              f"compile pays back after {f'{break_even:.0f} steps' if break_even else 'never'}   ({total:.0f} s in all)")


if __name__ == "__main__":
    main()
