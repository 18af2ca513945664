"""Sparse kernels: CSR Linear and 1x1 convolution layers compute what the dense ones do, the
per-layer choice follows the (fake) timings, saved models rebuild their CSR layers, and the stage
runs from a recipe."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from effitrain.checkpoint import load_weights, save_weights, saved_shapes
from effitrain.measure import count_parameters, sparsity
from effitrain.prune import kernels
from effitrain.prune.masks import nm_masks
from effitrain.prune.kernels import (KernelChoice, SemiStructuredLinear, SparseConv1x1, SparseLinear, apply_kernels, choose_kernels, csr_unsupported,
                                     layer_sparsity, restore_kernels)

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


def sparse_convnet() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 24, 1, stride=2, bias=False),
                          nn.Flatten(1), nn.Linear(24 * 4 * 4, 5))
    with torch.no_grad():
        for layer in (model[2], model[4]):
            layer.weight[torch.rand_like(layer.weight) < 0.85] = 0
    return model.eval()


@pytest.mark.parametrize("conv, inputs", [
    (nn.Conv2d(16, 32, 1), torch.randn(3, 16, 7, 5)),
    (nn.Conv2d(16, 32, 1, stride=2, bias=False), torch.randn(1, 16, 7, 5)),
    (nn.Conv2d(16, 32, 1, stride=(2, 1), padding="valid"), torch.randn(2, 16, 7, 6)),
    (nn.Conv2d(16, 32, 1), torch.randn(16, 7, 5)),  # unbatched, as nn.Conv2d allows
    (nn.Conv1d(8, 4, 1), torch.randn(2, 8, 9)),
])
def test_csr_1x1_convolution_computes_the_dense_one(conv, inputs) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < 0.8] = 0
        for sparse in (SparseConv1x1(conv), SparseConv1x1(conv, per_image=True)):  # both layouts
            assert sparse.weight_counts() == (conv.weight.numel(), int((conv.weight != 0).sum()))
            assert torch.allclose(sparse(inputs), conv(inputs), atol=1e-5) and sparse(inputs).shape == conv(inputs).shape
        assert torch.equal(sparse.dense_layer().weight, conv.weight)  # what ONNX export writes


def test_only_plain_1x1_convolutions_have_a_csr_kernel() -> None:
    assert csr_unsupported(nn.Conv2d(4, 4, 1)) is None and csr_unsupported(nn.Linear(4, 4)) is None
    assert csr_unsupported(nn.Conv2d(4, 4, 1, padding="same")) is None  # pads a 1x1 by nothing
    assert csr_unsupported(nn.Conv2d(4, 4, 3)) == "a 3x3 convolution (1x1 only)"
    assert csr_unsupported(nn.Conv2d(4, 4, 1, padding=1)) == "a padded 1x1 convolution"
    assert csr_unsupported(nn.Conv2d(4, 4, 1, groups=2)) == "a grouped convolution"


def test_saved_csr_convolutions_are_rebuilt_from_the_file(tmp_path) -> None:
    model = sparse_convnet()
    inputs = torch.randn(2, 3, 8, 8)
    expected = model(inputs)
    apply_kernels(model, {"2": "csr", "4": "csr per image"})
    assert torch.allclose(model(inputs), expected, atol=1e-5)
    save_weights(model, tmp_path / "m.safetensors")
    fresh = restore_kernels(sparse_convnet(), saved_shapes(tmp_path / "m.safetensors"))
    assert isinstance(fresh[2], SparseConv1x1) and fresh[4].stride == (2, 2) and isinstance(fresh[0], nn.Conv2d)
    load_weights(fresh, tmp_path / "m.safetensors")
    assert not fresh[2].per_image and fresh[4].per_image  # the layout the run chose
    assert torch.equal(fresh(inputs), model(inputs))


def test_choice_follows_the_timings(monkeypatch) -> None:
    assert KernelChoice("a", 0.9, {"dense": 1.0, "csr": 0.9}).kernel == "csr"
    assert not KernelChoice("a", 0.9, {"dense": 1.0, "csr": 0.97}).sparse  # under 5%: noise
    assert KernelChoice("a", 0.9, {"dense": 1.0, "csr": 0.5}).describe() == "a (90% zeros) dense 1.000 ms, csr 0.500 ms -> csr"
    # the fastest kernel wins; one that could not run is said, not fatal
    both = KernelChoice("a", 0.5, {"dense": 1.0, "csr": 2.0, "2:4 cutlass": 0.6}, {"2:4 cusparselt": "no cuSPARSELt"})
    assert both.kernel == "2:4 cutlass" and both.describe().endswith("2:4 cutlass 0.600 ms, 2:4 cusparselt failed (no cuSPARSELt) -> 2:4 cutlass")
    fake = {"0": {"dense": 2.0, "csr": 1.0}, "2": {"dense": 1.0, "csr": 3.0}}
    order = iter(["0", "2"])
    monkeypatch.setattr(kernels, "interleaved", lambda runners, *args: fake[next(order)])
    choices = choose_kernels(sparse_mlp(), torch.randn(4, 24), ["0", "2"], 1, 1, 0)
    assert [(choice.layer, choice.kernel) for choice in choices] == [("0", "csr"), ("2", "dense")]


def test_a_kernel_that_fails_here_is_left_out_with_its_reason(monkeypatch) -> None:
    def refuses() -> nn.Module:
        raise RuntimeError("Error original_tensor.device= cpu is not supported!\n Only CUDA tensors are currently supported.")

    monkeypatch.setattr(kernels, "kernel_candidates", lambda layer, device, dtype: {"csr": lambda: kernels.sparse_kernel(layer), "2:4 cutlass": refuses})
    [choice] = choose_kernels(sparse_mlp(), torch.randn(4, 24), ["2"], 1, 1, 0)
    assert set(choice.times) == {"dense", "csr"}
    assert choice.failed == {"2:4 cutlass": "Error original_tensor.device= cpu is not supported! Only CUDA tensors are currently supported."}


def two_four_linear(rows: int = 64, cols: int = 128) -> nn.Linear:
    """A Linear layer pruned 2:4 (the two largest of every 4 weights along a row kept)."""
    torch.manual_seed(2)
    layer = nn.Linear(cols, rows)
    with torch.no_grad():
        layer.weight.mul_(nm_masks({"w": layer.weight.abs()}, 2, 4, "test")["w"])  # what `granularity: nm` does
    return layer


def test_two_four_pattern_and_which_kernels_a_layer_gets() -> None:
    layer = two_four_linear()
    assert kernels.is_two_four(layer.weight) and layer_sparsity(layer) == 0.5
    assert not kernels.is_two_four(nn.Linear(128, 64).weight) and not kernels.is_two_four(torch.zeros(4, 6))  # 6 is no multiple of 4
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert list(kernels.kernel_candidates(layer, cpu, torch.float32)) == ["csr"]  # 2:4 kernels are CUDA's
    assert list(kernels.kernel_candidates(sparse_convnet()[2], cpu, torch.float32)) == ["csr", "csr per image"]  # a 1x1 conv's two layouts
    assert list(kernels.kernel_candidates(layer, cuda, torch.float16)) == ["csr", "2:4 cusparselt", "2:4 cutlass"]
    assert list(kernels.kernel_candidates(layer, cuda, torch.float32)) == ["csr", "2:4 cutlass"]  # cuSPARSELt takes no fp32
    assert list(kernels.kernel_candidates(sparse_mlp()[2], cuda, torch.float16)) == ["csr"]  # 90% random zeros are not 2:4


def test_two_four_layer_off_cuda_is_the_dense_layer_and_reloads_with_its_kernel(tmp_path) -> None:
    model = nn.Sequential(two_four_linear(), nn.ReLU(), nn.Linear(64, 5)).eval()
    inputs = torch.randn(3, 128)
    expected = model(inputs)
    apply_kernels(model, {"0": "2:4 cusparselt"}, torch.bfloat16)
    assert isinstance(model[0], SemiStructuredLinear) and (model[0].kernel, model[0].dtype) == ("2:4 cusparselt", torch.bfloat16)
    assert torch.equal(model(inputs), expected)  # a CPU computes the dense layer with the same values
    assert count_parameters(model)[0] == 128 * 64 + 64 + 64 * 5 + 5
    save_weights(model, tmp_path / "m.safetensors")
    fresh = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 5))
    restore_kernels(fresh, saved_shapes(tmp_path / "m.safetensors"))
    load_weights(fresh, tmp_path / "m.safetensors")
    assert isinstance(fresh[0], SemiStructuredLinear) and (fresh[0].kernel, fresh[0].dtype) == ("2:4 cusparselt", torch.bfloat16)
    assert torch.equal(fresh.eval()(inputs), expected) and torch.equal(fresh[0].dense_layer().weight, model[0].weight)
    model[0]._packed = (("2:4 cusparselt",), torch.ones(1))  # stands for the CUDA-packed weight
    assert copy.deepcopy(model)[0]._packed is None and model[0]._packed is not None  # copies repack from the weight
    model.load_state_dict(model.state_dict())
    assert model[0]._packed is None  # a load drops the packing of the old weight


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0), reason="2:4 kernels need a CUDA GPU from Ampere on")
@pytest.mark.parametrize("kernel, dtype", [("2:4 cusparselt", torch.float16), ("2:4 cutlass", torch.float16), ("2:4 cutlass", torch.float32)])
def test_two_four_kernels_on_a_gpu_compute_the_dense_layer(kernel, dtype) -> None:
    layer = two_four_linear(256, 512).cuda()
    inputs = torch.randn(2, 50, 512, device="cuda")  # rows the kernels pad
    with torch.no_grad():
        sparse = SemiStructuredLinear(layer, kernel, dtype)
        expected = nn.functional.linear(inputs.to(dtype), layer.weight.to(dtype), layer.bias.to(dtype)).float()
        assert torch.allclose(sparse(inputs), expected, rtol=1e-2, atol=1e-2)


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
    """MobileNet v3 small: 1x1 convolutions and Linear layers are timed, its depthwise and 3x3 ones are not."""
    result = run_cli("run", "recipe=baseline", "model=torchvision", "model.name=mobilenet_v3_small", "data=synthetic", "data.input_shape=[3,16,16]",
                     "data.num_samples=256", "trainer.max_epochs=1", "measure.repeats=10", "measure.warmup=1", "measure.batch_size=8",
                     "+stage@stage.pruned=prune", "stage.pruned.sparsity=0.9", "stage.pruned.schedule=oneshot", "stage.pruned.fine_tune=false",
                     "+stage@stage.fast=sparsify", "stage.fast.passes=1", "measure.rounds=1", "measure.final_retime=false", "report=false",
                     "hydra.run.dir=run", cwd=workdir, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {row["name"]: row["metrics"] for row in read_summary(workdir / "run")["stages"]}
    fast = rows["fast"]
    assert fast["kernels"].startswith("csr") and "of 42 Linear/1x1 conv layers" in fast["kernels"], fast["kernels"]
    assert "12 other convolutions have no CSR kernel" in fast["kernels"]
    assert any(".block." in line for line in fast["kernel_choices"])  # 1x1 convolutions were timed (the Linear layers are classifier.*)
    assert all(line.endswith(("-> csr", "-> csr per image", "-> dense")) for line in fast["kernel_choices"]) and fast["kernel_choices"]
    assert fast["params"] == rows["pruned"]["params"] and fast["sparsity"] == pytest.approx(rows["pruned"]["sparsity"])
    assert fast["accuracy"] == pytest.approx(rows["pruned"]["accuracy"])
    exported = run_cli("export", "run:fast", "-o", "fast.onnx", cwd=workdir, timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads((workdir / "fast.export.json").read_text())["agreement"] >= 0.99


def test_a_model_without_csr_layers_is_refused_before_the_run(workdir) -> None:
    result = run_cli("run", "recipe=baseline", *TINY, "+stage@stage.fast=sparsify", "stage.fast.skip=[classifier.*]", "hydra.run.dir=run", cwd=workdir)
    assert result.returncode == 2 and not (workdir / "run").exists()
    assert result.stderr.strip() == ("error: stage.fast: SmallCNN has no Linear or 1x1 convolution layer to run sparse "
                                     "(features.0 is a 3x3 convolution (1x1 only), features.4 is a 3x3 convolution (1x1 only))")
