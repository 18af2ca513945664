"""Distillation: the KD loss, intermediate-layer matching, teacher sources, derived students,
cached teacher outputs, codistillation and churn."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effitrain.checkpoint import save_weights
from effitrain.data.synthetic import build_synthetic
from effitrain.distill.features import FeatureMatch, FeaturePair, parse_pairs
from effitrain.distill.loss import DistillLoss, kd_loss
from effitrain.distill.sources import cache_teacher_outputs, derive_student, resolve_teacher, teacher_source
from effitrain.errors import ConfigError
from effitrain.models.cnn import SmallCNN
from effitrain.predictions import churn, compare_runs, write_predictions
from effitrain.distill.codistill import CodistillLoss, PeerBatches, Peers


def test_kd_loss_matches_the_formula() -> None:
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    T, alpha = 3.0, 0.7
    p_teacher = F.softmax(teacher / T, dim=-1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / T, dim=-1))).sum(dim=-1).mean()
    expected = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(student, labels)
    assert torch.allclose(kd_loss(student, teacher, labels, T, alpha), expected, atol=1e-6)
    assert torch.allclose(kd_loss(student, teacher, labels, T, 0.0), F.cross_entropy(student, labels))
    # a student that already agrees with its teacher has no soft loss left
    assert torch.allclose(kd_loss(teacher, teacher, labels, T, 1.0), torch.tensor(0.0), atol=1e-6)


def test_kd_gradient_scale_is_stable_across_temperatures() -> None:
    """The T² factor keeps the soft term's gradient magnitude roughly constant (Hinton et al.)."""
    torch.manual_seed(0)
    teacher, labels = torch.randn(64, 10) * 3, torch.randint(0, 10, (64,))
    norms = []
    for T in (2.0, 8.0):
        student = torch.zeros(64, 10, requires_grad=True)
        kd_loss(student, teacher, labels, T, 1.0).backward()
        norms.append(student.grad.norm().item())
    assert 0.3 < norms[0] / norms[1] < 3


def test_distill_loss_averages_teachers_without_training_them() -> None:
    torch.manual_seed(0)
    teachers = [nn.Linear(4, 3), nn.Linear(4, 3)]
    student = nn.Linear(4, 3)
    inputs, labels = torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss_fn = DistillLoss(teachers, temperature=2.0, alpha=1.0)
    assert all(not teacher.training and not any(p.requires_grad for p in teacher.parameters()) for teacher in teachers)
    mean = (teachers[0](inputs) + teachers[1](inputs)) / 2
    assert torch.allclose(loss_fn(student, inputs, labels), kd_loss(student(inputs), mean, labels, 2.0, 1.0))
    loss_fn(student, inputs, labels).backward()
    assert student.weight.grad is not None and all(p.grad is None for t in teachers for p in t.parameters())
    assert list(loss_fn.parameters()) == []  # teachers are not the loss's parameters: not trained, not saved


def test_feature_names_are_checked_and_listed() -> None:
    student, teacher = SmallCNN((1, 8, 8), 10, channels=(4, 8)), SmallCNN((1, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"student layer 'features.99' does not exist in SmallCNN \(valid names: features, features.0, "):
        FeatureMatch.build(student, teacher, [FeaturePair("features.99", "features.2")], torch.randn(2, 1, 8, 8), "stage.s.features")


def test_feature_widths_get_projections_and_bad_shapes_fail() -> None:
    student, teacher = SmallCNN((1, 8, 8), 10, channels=(4, 8), hidden=16), SmallCNN((1, 8, 8), 10)
    example = torch.randn(2, 1, 8, 8)
    pairs = [FeaturePair("features.2", "features.2"), FeaturePair("classifier.2", "classifier.2", loss="cosine")]
    match = FeatureMatch.build(student, teacher, pairs, example, "f")
    assert isinstance(match.projections[0], nn.Conv2d) and match.projections[0].in_channels == 4 and match.projections[0].out_channels == 32
    assert isinstance(match.projections[1], nn.Linear) and match.projections[1].in_features == 16
    match.start()
    student(example), teacher(example)
    loss = match.loss()
    match.stop()
    loss.backward()
    assert match.projections[0].weight.grad is not None
    with pytest.raises(ConfigError, match=r"^f: cannot match student 'features.2' output \(2, 4, 8, 8\) to teacher 'pool' output \(2, 64, 1, 1\) \(allowed: "):
        FeatureMatch.build(student, teacher, [FeaturePair("features.2", "pool")], example, "f")


def test_feature_pairs_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"features\[0\].loss = 'l1' is not allowed \(allowed: mse, cosine\)"):
        parse_pairs([{"student": "a", "teacher": "b", "loss": "l1"}], "features")
    with pytest.raises(ConfigError, match=r"features\[0\] = .* is not allowed"):
        parse_pairs([{"student": "a"}], "features")


def test_identical_features_cost_nothing() -> None:
    torch.manual_seed(0)
    teacher = SmallCNN((1, 8, 8), 10)
    student = SmallCNN((1, 8, 8), 10)
    student.load_state_dict(teacher.state_dict())
    student.eval(), teacher.eval()
    match = FeatureMatch.build(student, teacher, [FeaturePair("features.2", "features.2", "mse")], torch.randn(2, 1, 8, 8), "f")
    loss_fn = DistillLoss([teacher], 2.0, 1.0, match)
    labels = torch.randint(0, 10, (4,))
    assert loss_fn(student, torch.randn(4, 1, 8, 8), labels).item() == pytest.approx(0.0, abs=1e-6)


def test_cached_teacher_outputs_match_the_teacher() -> None:
    data = build_synthetic(num_samples=64, batch_size=8)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    loader = cache_teacher_outputs(data.train, lambda x: teacher(x).detach(), torch.device("cpu"), "c")
    seen = 0
    for inputs, (labels, logits) in loader:
        assert torch.allclose(logits, teacher(inputs), atol=1e-6)
        seen += len(labels)
    assert seen == len(data.train.dataset)
    augmented = build_synthetic(num_samples=64, batch_size=8, augment=[{"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"}])
    with pytest.raises(ConfigError, match="cannot cache teacher outputs with data.augment set"):
        cache_teacher_outputs(augmented.train, teacher, torch.device("cpu"), "c")


def tiny_bert(layers: int = 4) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return BertForSequenceClassification(config).eval()


def test_derived_student_keeps_every_kth_layer_with_teacher_weights() -> None:
    teacher = tiny_bert(4)
    student = derive_student(teacher, 2, "k").eval()
    assert len(student.bert.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    for kept, source in zip(student.bert.encoder.layer, (teacher.bert.encoder.layer[0], teacher.bert.encoder.layer[2])):
        assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), source.state_dict().values()))
    assert len(teacher.bert.encoder.layer) == 4  # the teacher is untouched
    ids = torch.randint(0, 100, (2, 8))
    assert student(input_ids=ids).logits.shape == (2, 3)
    with pytest.raises(ConfigError, match="keep_every needs a teacher with a list of repeated layers"):
        derive_student(SmallCNN((1, 8, 8), 10), 2, "k")
    with pytest.raises(ConfigError, match=r"allowed: an integer in \[2, 4\]"):
        derive_student(teacher, 5, "k")


def test_teacher_sources(tmp_path) -> None:
    model_cfg = {"_target_": "effitrain.models.cnn.SmallCNN", "input_shape": [1, 8, 8], "num_classes": 10}
    from omegaconf import OmegaConf

    from effitrain.stages.base import build_model

    trained = build_model(OmegaConf.create(model_cfg))
    save_weights(trained, tmp_path / "t.safetensors")
    earlier = {"teacher": trained}
    assert resolve_teacher("teacher", earlier, None, build_model, None, "w") is trained
    loaded = resolve_teacher(str(tmp_path / "t.safetensors"), earlier, OmegaConf.create(model_cfg), build_model, None, "w")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    with pytest.raises(ConfigError, match=r"w = 'nope': no such teacher \(allowed: teacher, pretrained, a .safetensors file, a run folder\[:STAGE\]\)"):
        resolve_teacher("nope", earlier, None, build_model, None, "w")
    from effitrain.runs import completed_stage

    with pytest.raises(ConfigError, match=r"^w: .*: not an effitrain run folder \(no summary.json or .hydra/config.yaml\)"):
        teacher_source(str(tmp_path), ["teacher"], "w", check_run=completed_stage)
    (tmp_path / "junk.safetensors").write_bytes(b"this is not safetensors")
    with pytest.raises(ConfigError, match=r"^w = '.*junk.safetensors': not a readable safetensors file"):
        teacher_source(str(tmp_path / "junk.safetensors"), ["teacher"], "w")


def test_churn_and_run_comparison(tmp_path) -> None:
    assert churn([0, 1, 2, 3], [0, 1, 2, 0]) == 0.25
    for name, predictions in (("a", [0, 1, 1, 0]), ("b", [0, 1, 0, 0])):
        (tmp_path / name / ".hydra").mkdir(parents=True)  # a run folder's shape: ledger plus composed config
        (tmp_path / name / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (tmp_path / name / "summary.json").write_text(json.dumps({"stages": [{"name": "fit"}]}))
        write_predictions(tmp_path / name / "predictions" / "fit.json", [0, 1, 1, 1], predictions)
    result = compare_runs(tmp_path / "a", tmp_path / "b")
    assert result["churn"] == 0.25 and result["accuracy_a"] == 0.75 and result["accuracy_b"] == 0.5
    write_predictions(tmp_path / "b" / "predictions" / "fit.json", [1, 1, 1, 1], [0, 1, 0, 0])
    with pytest.raises(ConfigError, match="tested on different examples"):
        compare_runs(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ConfigError, match=r"no predictions for stage 'x' \(allowed: fit\)"):
        compare_runs(tmp_path / "a", tmp_path / "b", "x")


def test_codistill_loss_is_plain_cross_entropy_before_burn_in() -> None:
    torch.manual_seed(0)
    peers = Peers([nn.Linear(4, 3), nn.Linear(4, 3)])
    inputs, labels = torch.randn(6, 4), torch.randint(0, 3, (6,))
    loss_fn = CodistillLoss(weight=1.0, temperature=1.0, burn_in_steps=10)
    plain = sum(F.cross_entropy(peer(inputs), labels) for peer in peers.peers)
    assert torch.allclose(loss_fn(peers, inputs, labels), plain)
    loss_fn.step = 10
    with_kd = loss_fn(peers, inputs, labels)
    assert with_kd > plain  # peers disagree, so the distillation term adds to the loss
    assert torch.allclose(CodistillLoss(0.0, 1.0, 0)(peers, inputs, labels), plain)
    assert torch.allclose(peers(inputs), (peers.peers[0](inputs) + peers.peers[1](inputs)) / 2)


def test_peers_get_their_own_data_order() -> None:
    data = build_synthetic(num_samples=64, batch_size=8)
    batches = PeerBatches(data.train, peers=2, seed=0)
    inputs, labels = next(iter(batches))
    assert set(inputs) == {"peer_0", "peer_1"} and not torch.equal(labels["peer_0"], labels["peer_1"])
    first_order = [batch[1]["peer_0"].tolist() for batch in batches]
    batches.set_epoch(3)
    assert all(loader.sampler.epoch == 3 for loader in batches.loaders)
    assert [batch[1]["peer_0"].tolist() for batch in batches] != first_order  # another epoch, another order
    batches.set_epoch(0)
    assert [batch[1]["peer_0"].tolist() for batch in batches] == first_order  # depends only on (seed, epoch)
