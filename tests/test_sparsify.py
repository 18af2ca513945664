"""Sparse kernels: CSR Linear layers compute what the dense ones do, the per-layer choice follows
the (fake) timings, saved models rebuild their CSR layers, and the stage runs from a recipe."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from effitrain.checkpoint import load_weights, save_weights, saved_shapes
from effitrain.measure import count_parameters, sparsity
from effitrain.prune import kernels
from effitrain.prune.kernels import KernelChoice, SparseLinear, apply_kernels, choose_kernels, restore_kernels

from conftest import read_summary, run_cli

TINY = ["data=synthetic", "model.channels=[8,16]", "model.hidden=16", "trainer.max_epochs=2", "measure.repeats=10", "measure.warmup=1"]


def sparse_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight[torch.rand_like(layer.weight) < 0.9] = 0
    return model.eval()


def test_csr_linear_computes_the_dense_layer_and_counts_like_it() -> None:
    model = sparse_mlp()
    inputs = torch.randn(3, 7, 24)  # any leading dimensions
    expected = model(inputs)
    before = count_parameters(model), sparsity(model)
    apply_kernels(model, ["0", "2"])
    assert isinstance(model[0], SparseLinear) and model[0].values.numel() == int((model[0].dense_weight() != 0).sum())
    assert torch.allclose(model(inputs), expected, atol=1e-5)
    assert count_parameters(model) == before[0] and sparsity(model) == pytest.approx(before[1])


def test_choice_follows_the_timings(monkeypatch) -> None:
    assert KernelChoice("a", 0.9, dense_ms=1.0, sparse_ms=0.9).sparse
    assert not KernelChoice("a", 0.9, dense_ms=1.0, sparse_ms=0.97).sparse  # under 5%: noise
    assert KernelChoice("a", 0.9, 1.0, 0.5).describe() == "a (90% zeros) dense 1.000 ms, csr 0.500 ms -> csr"
    fake = {"0": {"dense": 2.0, "csr": 1.0}, "2": {"dense": 1.0, "csr": 3.0}}
    order = iter(["0", "2"])
    monkeypatch.setattr(kernels, "interleaved", lambda runners, *args: fake[next(order)])
    choices = choose_kernels(sparse_mlp(), torch.randn(4, 24), ["0", "2"], 1, 1, 0)
    assert [(choice.layer, choice.sparse) for choice in choices] == [("0", True), ("2", False)]


def test_saved_csr_layers_are_rebuilt_from_the_file(tmp_path) -> None:
    model = sparse_mlp()
    apply_kernels(model, ["2"])
    save_weights(model, tmp_path / "m.safetensors")
    fresh = restore_kernels(sparse_mlp(), saved_shapes(tmp_path / "m.safetensors"))
    assert isinstance(fresh[2], SparseLinear) and isinstance(fresh[0], nn.Linear)
    load_weights(fresh, tmp_path / "m.safetensors")
    inputs = torch.randn(5, 24)
    assert torch.equal(fresh(inputs), model(inputs))


def test_sparsify_stage_after_pruning_through_the_cli(workdir) -> None:
    result = run_cli("run", "recipe=prune_gradual_digits", *TINY, "stage.dense.trainer.max_epochs=1", "+stage@stage.fast=sparsify",
                     "stage.fast.passes=2", "measure.rounds=2", "hydra.run.dir=run", cwd=workdir, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["name"]: row["metrics"] for row in read_summary(workdir / "run")["stages"]}
    fast = rows["fast"]
    assert fast["kernels"].startswith("csr in ") and "of 2 Linear layers" in fast["kernels"]
    assert all(line.endswith(("-> csr", "-> dense")) for line in fast["kernel_choices"]) and fast["kernel_choices"]
    assert fast["params"] == rows["pruned"]["params"] and fast["sparsity"] == pytest.approx(rows["pruned"]["sparsity"])
    exported = run_cli("export", "run:fast", "-o", "fast.onnx", cwd=workdir, timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((workdir / "fast.export.json").read_text())["agreement"] >= 0.99
