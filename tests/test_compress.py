"""Low-rank factorisation and weight clustering."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from effitrain.compress import lowrank
from effitrain.compress.cluster import ClusteredWeight
from effitrain.errors import ConfigError

from conftest import read_summary, run_cli


@pytest.mark.parametrize("layer", [nn.Linear(24, 16), nn.Conv2d(12, 20, 1)])
def test_svd_at_full_rank_reproduces_the_layer(layer: nn.Module) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 24) if isinstance(layer, nn.Linear) else torch.randn(2, 12, 4, 4)
    full = min(layer.weight.shape[0], layer.weight[0].numel())
    assert torch.allclose(lowrank.factorize(layer, full)(x), layer(x), atol=1e-5)


def test_truncated_svd_is_the_best_rank_r_approximation() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 32)
    approx = lowrank.factorize(layer, 8)
    product = approx[1].weight @ approx[0].weight
    s = torch.linalg.svdvals(layer.weight.detach())
    assert torch.linalg.matrix_norm(layer.weight.detach() - product).item() == pytest.approx(s[8:].pow(2).sum().sqrt().item(), rel=1e-4)
    assert lowrank.choose_rank(layer, None, 1.0) == 32 and lowrank.choose_rank(layer, 0.25, None) == 8
    assert lowrank.plan(layer, [""], 0.9, None) == {}  # a rank that would not shrink the layer is skipped
    with pytest.raises(ConfigError, match="only Linear and 1x1 Conv2d layers can be factorised"):
        lowrank.plan(nn.Sequential(nn.Conv2d(3, 4, 3)), ["0"], 0.5, None)


@pytest.mark.parametrize("k", [4, 16, 64])
def test_clustering_uses_exactly_k_values_and_packs_indices(k: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    clustered = ClusteredWeight(layer, k)
    assert len(torch.unique(clustered.weight())) == k
    assert clustered.indices.numel() == (64 * 32 // 2 if k <= 16 else 64 * 32)
    x = torch.randn(3, 64)
    assert (clustered(x) - layer(x)).abs().mean() < (0.2 if k == 4 else 0.05)
    clustered(x).sum().backward()
    assert clustered.codebook.grad is not None  # fine-tuning moves the shared centroids
    with pytest.raises(ConfigError, match=r"clusters = 1 is not allowed"):
        ClusteredWeight(layer, 1)


def test_compress_recipe_rows_and_fresh_process_reload(workdir: Path) -> None:
    result = run_cli("run", "recipe=compress_digits", "data=synthetic", "trainer.max_epochs=2", "stage.lowrank.trainer.max_epochs=1",
                     "stage.cluster4.trainer.max_epochs=1", "measure.repeats=10", "measure.warmup=1", "hydra.run.dir=run", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row["metrics"] for row in read_summary(workdir / "run")["stages"]}
    assert list(rows) == ["fp32", "lowrank", "cluster16", "cluster4"]
    assert rows["lowrank"]["params"] < rows["fp32"]["params"]
    assert rows["cluster16"]["size_bytes"] < 0.3 * rows["fp32"]["size_bytes"]
    from effitrain.runs import load_run_model
    from effitrain.tasks import Classification
    from effitrain.precision import build_precision

    for stage in ("lowrank", "cluster4"):
        model, data = load_run_model(workdir / "run", stage)
        assert Classification().evaluate(model, data.test, build_precision("fp32", torch.device("cpu")))["accuracy"] == pytest.approx(rows[stage]["accuracy"])
