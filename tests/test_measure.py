"""Ledger measurements against hand counts."""

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from effitrain.checkpoint import load_weights, save_weights
from effitrain.measure import count_parameters, latency_ms, sparsity
from effitrain.precision import build_precision
from effitrain.tasks import Classification

FP32 = build_precision("fp32", torch.device("cpu"))


def test_counts_and_sparsity() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[:2] = 0.0  # 8 of 12 + 6 prunable weights are zero
    params, nonzero = count_parameters(model)
    assert params == 4 * 3 + 3 + 3 * 2 + 2
    assert params - nonzero == 8  # the zeroed rows; every other parameter is a nonzero random init
    assert sparsity(model) == 8 / 18


def test_evaluate_accuracy_and_loss() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    inputs = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])  # the third is wrong
    scores = Classification().evaluate(model, DataLoader(TensorDataset(inputs, labels), batch_size=3), FP32)
    assert scores["accuracy"] == 0.75
    right, wrong = -torch.log_softmax(torch.tensor([2.0, 0.0]), 0)
    assert abs(scores["loss"] - (3 * right + wrong).item() / 4) < 1e-6


def test_latency_is_positive_and_restores_threads_and_mode() -> None:
    model = nn.Linear(8, 8).train()
    threads = torch.get_num_threads()
    assert latency_ms(model, torch.randn(4, 8), FP32, warmup=1, repeats=10, threads=1) > 0
    assert torch.get_num_threads() == threads and model.training


def test_weights_roundtrip_with_tied_parameters(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    save_weights(model, tmp_path / "w.safetensors")
    other = Tied()
    load_weights(other, tmp_path / "w.safetensors")
    assert torch.equal(other.head.weight, model.embed.weight)
    assert other.head.weight is other.embed.weight
