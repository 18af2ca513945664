"""Pruning: masks stay exact, schedules follow their formulas, structured surgery is faithful,
thresholds distribute as configured, RigL keeps sparsity, and a resumed schedule continues."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from effitrain.data.synthetic import build_synthetic
from effitrain.errors import ConfigError
from effitrain.models.cnn import SmallCNN
from effitrain.precision import build_precision
from effitrain.prune.hook import MaskHook, polynomial_sparsity, rigl_fraction
from effitrain.prune.masks import apply_masks, layer_sparsities, magnitude_masks, nm_masks, prunable, saliency_scores
from effitrain.prune.structured import prune_channels, shrink_to
from effitrain.runlog import RunLogger
from effitrain.trainer import Trainer

from conftest import run_cli_batch, assert_refused, read_summary, run_cli, run_dirs, schedule, trainer_config


def make_trainer(folder: Path, hook: MaskHook, epochs: int = 2) -> Trainer:
    return Trainer(
        trainer_config(max_epochs=epochs, restore_best=False),
        lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), schedule("constant"),
        build_precision("fp32", torch.device("cpu")), RunLogger(folder, tensorboard=False), "p", folder / "ckpt", hooks=[hook],
    )


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN((1, 8, 8), 4, channels=(8, 16), hidden=16)


def masks_at(model: nn.Module, sparsity: float, distribution: str = "global", own: dict | None = None) -> dict:
    names = list(prunable(model))
    return magnitude_masks(saliency_scores(model, "l1", names), sparsity, own or {name: None for name in names}, distribution)


def test_masked_weights_stay_exactly_zero_through_adamw_steps(tmp_path) -> None:
    model, data = cnn(), build_synthetic(num_samples=128, num_classes=4, batch_size=16)
    before = copy.deepcopy(model)
    masks = masks_at(model, 0.7)
    make_trainer(tmp_path, MaskHook(masks)).fit(model, data.train, data.val)
    for name, weight in prunable(model).items():
        assert torch.all(weight[~masks[name]] == 0), name
        assert not torch.equal(weight[masks[name]], prunable(before)[name][masks[name]])  # the rest trained


def test_polynomial_schedule_matches_zhu_and_gupta() -> None:
    s_i, s_f, t0, end = 0.1, 0.9, 10, 110
    for t in (10, 35, 60, 85, 110):
        assert polynomial_sparsity(t, s_i, s_f, t0, end) == pytest.approx(s_f + (s_i - s_f) * (1 - (t - t0) / (end - t0)) ** 3)
    assert polynomial_sparsity(0, s_i, s_f, t0, end) == s_i and polynomial_sparsity(500, s_i, s_f, t0, end) == s_f
    assert rigl_fraction(0, 0.3, 100) == pytest.approx(0.3) and rigl_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert rigl_fraction(100, 0.3, 100) == 0


def test_global_and_uniform_thresholds() -> None:
    model = cnn()
    uniform = masks_at(model, 0.6, "uniform")
    for mask in uniform.values():
        assert (~mask).sum().item() == round(0.6 * mask.numel())
    global_masks = masks_at(model, 0.6, "global")
    total = sum(mask.numel() for mask in global_masks.values())
    assert sum((~mask).sum().item() for mask in global_masks.values()) == round(0.6 * total)
    assert len({round((~m).float().mean().item(), 3) for m in global_masks.values()}) > 1  # layers differ
    own = layer_sparsities(list(prunable(model)), 0.6, {"features.0": 0, "classifier.*": 0.2}, "o")
    assert own == {"features.0": 0.0, "features.4": None, "classifier.1": 0.2, "classifier.4": 0.2}
    with_own = masks_at(model, 0.6, "global", own)
    assert with_own["features.0"].all()
    assert (~with_own["classifier.1"]).float().mean().item() == pytest.approx(0.2, abs=0.01)
    with pytest.raises(ConfigError, match=r"pattern 'conv\*' matches no prunable layer \(prunable: features.0, features.4, classifier.1, classifier.4\)"):
        layer_sparsities(list(prunable(model)), 0.6, {"conv*": 0}, "o")


def test_nm_masks_keep_n_of_every_m() -> None:
    weight = torch.randn(8, 16)
    mask = nm_masks({"fc": weight.abs()}, 2, 4, "w")["fc"]
    assert torch.all(mask.reshape(8, 4, 4).sum(-1) == 2)
    kept = (weight.abs() * mask).reshape(8, 4, 4)
    cut = (weight.abs() * ~mask).reshape(8, 4, 4)
    assert torch.all(kept.max(-1).values >= cut.max(-1).values)
    with pytest.raises(ConfigError, match="layer conv has 9 inputs per output, not a multiple of M=4"):
        nm_masks({"conv": torch.rand(4, 1, 3, 3)}, 2, 4, "w")


def test_rigl_keeps_sparsity_constant_while_masks_move(tmp_path) -> None:
    model, data = cnn(), build_synthetic(num_samples=256, num_classes=4, batch_size=16)
    masks = masks_at(model, 0.8)
    start = {name: mask.clone() for name, mask in masks.items()}
    hook = MaskHook(masks, "rigl", frequency=2, drop_fraction=0.3, end_step=20)
    make_trainer(tmp_path, hook, epochs=2).fit(model, data.train, data.val)
    assert hook.updates >= 5
    for name, mask in hook.masks.items():
        assert mask.sum() == start[name].sum(), name  # same number of active weights per layer
        assert torch.all(prunable(model)[name][~mask] == 0)
    assert any(not torch.equal(hook.masks[name], start[name]) for name in start)


def test_gradual_schedule_resumes_mid_way(tmp_path) -> None:
    data = build_synthetic(num_samples=256, num_classes=4, batch_size=16)

    def run(folder: Path, epochs: int, resume: bool, model: nn.Module) -> MaskHook:
        def remask(current: nn.Module, target: float) -> dict:
            return masks_at(current, target)
        hook = MaskHook(masks_at(model, 0.0), "gradual", remask, 0.0, 0.8, 0, 40, 5)
        make_trainer(folder, hook, epochs).fit(model, data.train, data.val, resume=resume)
        return hook

    straight = cnn()
    run(tmp_path / "a", 4, False, straight)
    resumed = cnn()
    run(tmp_path / "b", 2, False, resumed)
    halfway = run(tmp_path / "b", 4, True, resumed)
    assert halfway.current_sparsity == pytest.approx(0.8)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_structured_surgery_keeps_unpruned_channels_and_shrinks_consumers() -> None:
    model = cnn().eval()
    original = copy.deepcopy(model)
    example = torch.randn(4, 1, 8, 8)
    prune_channels(model, example, 0.5, {name: None for name in prunable(model)}, "l1", "uniform", "s")
    kept_weight = model.features[0].weight
    assert kept_weight.shape[0] == 4 and model.features[4].weight.shape[1] == 4  # the next conv shrank to match
    assert model.features[1].num_features == 4  # and the batch-norm
    rows = [i for i in range(8) if any(torch.equal(original.features[0].weight[i], w) for w in kept_weight)]
    assert len(rows) == 4
    assert torch.allclose(model.features[0](example), original.features[0](example)[:, rows])
    assert model(example).shape == (4, 4) and model.classifier[4].out_features == 4  # logits layer whole
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    rebuilt = shrink_to(cnn(), shapes, example)
    rebuilt.load_state_dict(model.state_dict())  # a resumed run rebuilds the pruned shapes
    assert torch.allclose(rebuilt.eval()(example), model(example))


def test_structured_refuses_overrides_on_other_layer_types() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    own = {"1": None, "3": None}
    own["2"] = 0.5
    with pytest.raises(ConfigError, match="layer 2 is LayerNorm; structured pruning supports Linear and Conv layers"):
        prune_channels(model, torch.randn(2, 1, 8, 8), 0.5, own, "l1", "uniform", "s")


def test_masks_apply_in_place() -> None:
    model = cnn()
    masks = masks_at(model, 0.5)
    apply_masks(model, masks)
    zeros = sum(int((w == 0).sum()) for w in prunable(model).values())
    assert zeros == sum(int((~m).sum()) for m in masks.values())


TINY = ["data=synthetic", "model.channels=[8,16]", "model.hidden=16", "trainer.max_epochs=2", "measure.repeats=10", "measure.warmup=1"]


def test_gradual_recipe_end_to_end_writes_layer_table(workdir: Path) -> None:
    result = run_cli("run", "recipe=prune_gradual_digits", *TINY, "stage.pruned.trainer.max_epochs=3", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(workdir)
    rows = read_summary(run_dir)["stages"]
    assert [row["name"] for row in rows] == ["dense", "pruned"]
    assert rows[0]["metrics"]["sparsity"] == 0 and rows[1]["metrics"]["sparsity"] == pytest.approx(0.9, abs=0.005)
    assert (run_dir / "pruning" / "pruned.json").is_file()
    assert "per-layer sparsity" in result.stdout + result.stderr


def test_structured_recipe_end_to_end_and_resume_of_completed_stage(workdir: Path) -> None:
    result = run_cli("run", "recipe=prune_structured_digits", *TINY, "stage.pruned.trainer.max_epochs=1", "hydra.run.dir=run", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_summary(workdir / "run")["stages"]
    assert rows[1]["metrics"]["params"] < 0.6 * rows[0]["metrics"]["params"]
    # mark the run unfinished after both stages: resume must rebuild the pruned shapes to load them
    summary = read_summary(workdir / "run")
    summary["status"] = "failed"
    (workdir / "run" / "summary.json").write_text(__import__("json").dumps(summary))
    result = run_cli("resume", "run", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already completed; loaded 01_pruned.safetensors" in result.stdout + result.stderr
    assert read_summary(workdir / "run")["stages"] == rows  # nothing re-run or re-measured
    # the reloaded pruned model is the one the ledger measured: same shapes, accuracy and predictions
    from effitrain.runs import load_run_model
    from effitrain.tasks import Classification

    model, data = load_run_model(workdir / "run", "pruned")
    scores = Classification().evaluate(model, data.test, build_precision("fp32", torch.device("cpu")), keep_predictions=True)
    assert scores["accuracy"] == rows[1]["metrics"]["accuracy"]
    assert scores["predictions"] == __import__("json").loads((workdir / "run" / "predictions" / "pruned.json").read_text())["predictions"]


BAD = [
    ("stage.pruned.sparsity=1", "stage.pruned.sparsity = 1.0 is not allowed (allowed: a number in [0, 1))"),
    ("stage.pruned.sparsity=-0.1", "stage.pruned.sparsity = -0.1 is not allowed (allowed: a number in [0, 1))"),
    ("stage.pruned.n=4", "stage.pruned.n:m = '4:4' is not allowed (allowed: 1 <= n < m, e.g. 2:4)"),
    ("stage.pruned.granularity=structured", "stage.pruned.schedule = 'gradual' is not allowed (allowed: oneshot, iterative (with granularity 'structured'))"),
    ("stage.pruned.saliency=nope", "stage.pruned.saliency = 'nope' is not allowed (allowed: l1, l2, taylor, obd, random"),
    ("stage.pruned.saliency_batches=0", "stage.pruned.saliency_batches = 0 is not allowed (allowed: an integer >= 1)"),
    ("stage.pruned.distribution=erk stage.pruned.granularity=nm stage.pruned.schedule=oneshot",
     "stage.pruned.distribution = 'erk' is not allowed (allowed: global, uniform (with granularity 'nm'; erk sets per-layer weight densities))"),
    ("stage.pruned.schedule=sometimes", "stage.pruned.schedule = 'sometimes' is not allowed (allowed: oneshot, iterative, gradual, rigl)"),
]


@pytest.fixture(scope="module")
def bad_prune(tmp_path_factory) -> dict:
    """Every case of BAD through the CLI, in one process (see conftest.run_cli_batch)."""
    cases = [["run", "recipe=prune_gradual_digits", *TINY, *override.split()] for override, _ in BAD]
    return dict(zip((override for override, _ in BAD), run_cli_batch(cases, tmp_path_factory.mktemp("refused"))))


@pytest.mark.parametrize("override,message", BAD, ids=[case[0] for case in BAD])
def test_bad_prune_input_is_one_line_and_no_run_folder(bad_prune: dict, override: str, message: str) -> None:
    folder, result = bad_prune[override]
    assert_refused(result, message, folder)


def test_unknown_module_pattern_is_one_line(workdir: Path) -> None:
    result = run_cli("run", "recipe=prune_gradual_digits", *TINY, "stage.dense.trainer.max_epochs=1", "stage.pruned.overrides={conv9: 0, features.0: 0}", cwd=workdir)
    assert_refused(result, "stage.pruned.overrides: pattern 'conv9' matches no prunable layer (prunable: features.0, features.4, "
                           "classifier.1, classifier.4)", workdir)  # checked on the recipe's model before the dense stage trains


def test_user_saliency_by_dotted_path() -> None:
    from effitrain.prune.masks import check_saliency

    check_saliency("conftest.negative_magnitude", "s")
    model = cnn()
    names = list(prunable(model))
    scores = saliency_scores(model, "conftest.negative_magnitude", names)
    masks = magnitude_masks(scores, 0.5, {name: None for name in names}, "uniform")
    weight, mask = prunable(model)["features.4"], masks["features.4"]
    assert weight[mask].abs().max() <= weight[~mask].abs().min()  # the user's rule: the largest went
    with pytest.raises(ConfigError, match=r"saliency = 'no.such.fn' is not allowed"):
        check_saliency("no.such.fn", "saliency")


def test_fisher_diagonal_is_the_mean_squared_per_example_gradient() -> None:
    from torch.func import functional_call, grad, vmap

    from effitrain.prune.masks import fisher_diagonal

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,))), (torch.randn(3, 4), torch.randint(0, 3, (3,)))]
    loss = lambda m, x, y: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    fisher = fisher_diagonal(model, batches, loss, None)
    assert model.training and all(p.grad is None for p in model.parameters())  # left as it was
    # the reference: per-example gradients by torch.func (eval mode: BatchNorm's running statistics, no dropout)
    model.eval()
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def one(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, (p, buffers), (x.unsqueeze(0),)), y.unsqueeze(0))

    inputs, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    per_example = vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)
    for name in params:
        assert torch.allclose(fisher[name], (per_example[name] ** 2).mean(0), atol=1e-6), name
    scores = saliency_scores(model, "obd", ["0", "4"], batches, loss)
    assert torch.allclose(scores["4"], 0.5 * fisher["4.weight"] * params["4.weight"] ** 2)


def test_erk_reaches_the_global_target_exactly_and_favours_small_layers() -> None:
    from effitrain.prune.masks import erk_sparsities

    model = cnn()
    weights = prunable(model)
    scores = {name: weight.detach().abs() for name, weight in weights.items()}
    total = sum(weight.numel() for weight in weights.values())
    for target in (0.5, 0.8, 0.95):
        masks = magnitude_masks(scores, target, {name: None for name in scores}, "erk")
        kept = sum(int(mask.sum()) for mask in masks.values())
        assert abs((1 - kept / total) - target) <= len(masks) / total  # exact up to rounding each layer to whole weights
    shapes = {"small": (8, 1, 3, 3), "big": (64, 128), "head": (10, 64)}
    densities = {name: 1 - value for name, value in erk_sparsities(shapes, 0.9, {}, "s").items()}
    assert densities["small"] > densities["head"] > densities["big"]
    # at a low target ERK would give the small conv a density above 1: it is capped dense and the rest re-solved
    low = erk_sparsities(shapes, 0.2, {}, "s")
    sizes = {name: torch.tensor(shape).prod().item() for name, shape in shapes.items()}
    assert low["small"] == 0.0 and abs(sum(low[n] * sizes[n] for n in shapes) / sum(sizes.values()) - 0.2) < 1e-9
    fixed = erk_sparsities(shapes, 0.5, {"head": 0.0}, "s")  # an override keeps its own and counts toward the total
    assert fixed["head"] == 0.0 and abs(sum(fixed[n] * sizes[n] for n in shapes) / sum(sizes.values()) - 0.5) < 1e-9
    with pytest.raises(ConfigError, match=r"stage.p.sparsity = 0.95: unreachable with distribution 'erk': the layers.*\(allowed: at most 0.0800"):
        erk_sparsities(shapes, 0.95, {"big": 0.0}, "stage.p")


def test_erk_with_a_schedule_through_the_cli(workdir: Path) -> None:
    # gradual asks for ERK masks at every intermediate target; oneshot/rigl use the same masks once
    for schedule_name in ("gradual",):
        result = run_cli("run", "recipe=prune_gradual_digits", *TINY, "stage.dense.trainer.max_epochs=1", "stage.pruned.distribution=erk",
                         f"stage.pruned.schedule={schedule_name}", "stage.pruned.saliency=obd", "stage.pruned.saliency_batches=1",
                         f"hydra.run.dir=erk_{schedule_name}", cwd=workdir)
        assert result.returncode == 0, result.stderr[-2000:]
        row = read_summary(workdir / f"erk_{schedule_name}")["stages"][1]["metrics"]
        assert abs(row["achieved_sparsity"] - 0.9) < 0.005, (schedule_name, row["achieved_sparsity"])


def test_old_run_folders_with_taylor_batches_still_build() -> None:
    from omegaconf import OmegaConf

    from effitrain.config import group_defaults
    from effitrain.stages.base import build_stage

    node = {key: value for key, value in group_defaults("stage", "prune").items() if key != "saliency_batches"}
    stage = build_stage("p", OmegaConf.create({**node, "taylor_batches": 3, "trainer": {}, "optimizer": {}, "scheduler": {}}))
    assert stage.saliency_batches == 3


def test_structured_obd_ranks_channels_by_the_fisher_weighted_squares() -> None:
    model = cnn()
    data = build_synthetic(num_samples=64, num_classes=4, input_shape=(1, 8, 8), batch_size=16)
    batches = [(inputs, labels) for inputs, labels in data.train][:2]
    loss = lambda m, x, y: nn.functional.cross_entropy(m(x), y)  # noqa: E731
    before = {name: module.weight.shape[0] for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    prune_channels(model, batches[0][0][:2], 0.5, {name: None for name in prunable(model)}, "obd", "uniform", "s", batches, loss)
    after = {name: module.weight.shape[0] for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    assert all(after[name] == before[name] // 2 for name in before)
    assert all(p.grad is None for p in model.parameters())
    assert model(batches[0][0]).shape == (16, 4)
