"""The learning techniques: Mixup/CutMix soft targets through every loss, training on a fraction
of the labels, NT-Xent, masked-language-model pre-training, the pretrain -> fine-tune chain
through the CLI (its encoder checked), a killed pre-training resumed, and the bad inputs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from effitrain.errors import ConfigError

from conftest import TINY, assert_refused, read_summary, run_and_kill, run_cli


# -- Mixup / CutMix -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mixup", "cutmix", "both"])
def test_mixed_targets_are_probabilities_and_inputs_are_mixed(kind: str) -> None:
    from torch.utils.data import default_collate

    from effitrain.data.mixing import MixCollate

    torch.manual_seed(0)
    samples = [(torch.rand(1, 8, 8), label) for label in (0, 1, 2, 3)]
    inputs, targets = MixCollate(default_collate, kind, 1.0, 1.0, 4)(samples)
    assert targets.shape == (4, 4) and torch.allclose(targets.sum(dim=1), torch.ones(4))
    assert not torch.equal(inputs, default_collate(samples)[0])
    untouched = MixCollate(default_collate, kind, 1.0, 0.0, 4)(samples)  # prob 0: the batch as it was
    assert untouched[1].tolist() == [0, 1, 2, 3]


def test_soft_targets_reach_cross_entropy_kd_and_codistillation() -> None:
    from effitrain.distill.codistill import CodistillLoss, Peers
    from effitrain.distill.loss import kd_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    soft = torch.softmax(torch.randn(5, 3), dim=1)
    hand_ce = -(soft * F.log_softmax(student, dim=1)).sum(dim=1).mean()
    t = 2.0
    hand_kl = (F.softmax(teacher / t, 1) * (F.log_softmax(teacher / t, 1) - F.log_softmax(student / t, 1))).sum(1).mean()
    assert kd_loss(student, teacher, soft, t, 0.3) == pytest.approx(float(0.3 * t * t * hand_kl + 0.7 * hand_ce), rel=1e-5)
    peers = Peers([torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)])
    inputs = torch.randn(5, 4)
    loss = CodistillLoss(0.0, 1.0, 0)(peers, inputs, soft).detach()
    with torch.no_grad():
        expected = sum(-(soft * F.log_softmax(peer(inputs), 1)).sum(1).mean() for peer in peers.peers)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# -- a fraction of the labels -------------------------------------------------------------------


def test_label_fraction_is_stratified_and_seeded() -> None:
    from effitrain.data.labels import labelled_subset

    labels = [0] * 50 + [1] * 30 + [2] * 20
    kept = labelled_subset(labels, 0.1, seed=3)
    assert sorted(labels[index] for index in kept) == [0] * 5 + [1] * 3 + [2] * 2
    assert labelled_subset(labels, 0.1, seed=3).tolist() == kept.tolist()
    assert labelled_subset(labels, 0.1, seed=4).tolist() != kept.tolist()
    assert len(labelled_subset(labels, 1.0, seed=0)) == 100
    with pytest.raises(ConfigError, match=r"data.label_fraction = 0.02 keeps no label of class 2 \(20 training examples\) "
                                          r"\(allowed: a fraction >= 0.0250, which keeps one label of every class\)"):
        labelled_subset(labels, 0.02, seed=0)


# -- NT-Xent ------------------------------------------------------------------------------------


def test_nt_xent_matches_the_papers_formula() -> None:
    from effitrain.selfsup.contrastive import nt_xent

    torch.manual_seed(0)
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    views = F.normalize(torch.cat([z1, z2]), dim=1)
    temperature, losses = 0.5, []
    for i in range(6):
        positive = (i + 3) % 6
        denominator = sum(math.exp(float(views[i] @ views[k]) / temperature) for k in range(6) if k != i)
        losses.append(-math.log(math.exp(float(views[i] @ views[positive]) / temperature) / denominator))
    assert float(nt_xent(z1, z2, temperature)) == pytest.approx(sum(losses) / 6, rel=1e-5)


# -- the pretrain -> fine-tune chain ------------------------------------------------------------

SSL = ["recipe=ssl_digits", "stage.pretrained.trainer.max_epochs=2", "stage.probe.trainer.max_epochs=2", "stage.finetuned.trainer.max_epochs=1",
       "~stage.scratch", "measure.repeats=10", "measure.warmup=1", "report=false",
       "measure.final_retime=false"]

PATCHED_FIT = """
import sys, torch
from safetensors.torch import save_file
from effitrain.trainer import loop
fit = loop.Trainer.fit
def recording(self, model, *args, **kwargs):
    if self.stage == "probe":
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, "probe_start.safetensors")
    return fit(self, model, *args, **kwargs)
loop.Trainer.fit = recording
from effitrain.cli import main
main(sys.argv[1:])
"""


def test_pretrain_then_finetune_starts_from_the_pretrained_encoder(workdir: Path) -> None:
    result = subprocess.run([sys.executable, "-c", PATCHED_FIT, "run", *SSL, "hydra.run.dir=run"], cwd=workdir,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(workdir / "run")
    pretrained, probe, finetuned = summary["stages"]
    assert pretrained["kind"] == "pretrain" and "accuracy" not in pretrained["metrics"]  # no classifier accuracy pretended
    assert 0 < pretrained["metrics"]["knn_accuracy"] <= 1 and pretrained["metrics"]["knn_labels"] == 127  # 10% of each class
    assert pretrained["metrics"]["method"] == "simclr" and pretrained["metrics"]["encoder"].startswith("everything before classifier")
    assert "accuracy" in probe["metrics"] and "accuracy" in finetuned["metrics"] and probe["metrics"]["frozen_params"] > 0
    checkpoints = workdir / "run" / "checkpoints"
    saved = load_file(str(next(checkpoints.glob("00_pretrained.*"))))
    start = load_file(str(workdir / "probe_start.safetensors"))
    assert set(saved) == set(start)
    for name in saved:  # the next stage starts from exactly what pre-training saved
        assert torch.equal(saved[name], start[name]), name
    probed = load_file(str(next(checkpoints.glob("01_probe.*"))))
    for name in saved:  # the probe trained the head alone: the encoder, BatchNorm statistics included, is as pre-trained
        assert torch.equal(saved[name], probed[name]) == name.startswith("features."), name
    assert "[pretrained] no task metrics (not a classifier yet)" in (workdir / "run" / "run.log").read_text()


def test_killed_pretraining_resumes_to_the_same_model(workdir: Path) -> None:
    settings = [*SSL, "stage.pretrained.trainer.max_epochs=3", "~stage.probe", "~stage.finetuned", "objective=[]"]
    assert run_cli("run", *settings, "hydra.run.dir=full", cwd=workdir).returncode == 0
    run_and_kill(["run", *settings, "hydra.run.dir=killed"], workdir, workdir / "killed" / "checkpoints" / "pretrained" / "last_state.pt")
    result = run_cli("resume", str(workdir / "killed"), cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "resumed after epoch" in result.stdout
    full, resumed = (read_summary(workdir / name)["stages"][0]["metrics"] for name in ("full", "killed"))
    assert full["knn_accuracy"] == resumed["knn_accuracy"] and full["pretrain_val_loss"] == resumed["pretrain_val_loss"]
    a, b = (load_file(str(next((workdir / name / "checkpoints").glob("00_pretrained.*")))) for name in ("full", "killed"))
    assert all(torch.equal(a[key], b[key]) for key in a)


# -- masked-language-model pre-training ---------------------------------------------------------


def test_masked_lm_trains_the_classifiers_own_encoder_on_masked_tokens_only() -> None:
    from effitrain.models.hf import hf_classifier, load_tokenizer
    from effitrain.selfsup.masked import MaskedLM, Masking

    torch.manual_seed(0)
    classifier = hf_classifier("minilm", 3, config={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                                    "intermediate_size": 64})
    tokenizer = load_tokenizer("minilm")
    encoded = tokenizer(["the market rose today", "a match was won"] * 4, padding="max_length", max_length=12, return_tensors="pt")
    samples = [({"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i]}, 0) for i in range(8)]
    inputs, labels = Masking(tokenizer, 0.5)(samples)
    special = torch.isin(encoded["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert bool((labels[special] == -100).all()) and bool((labels != -100).any())  # padding and [CLS]/[SEP] never masked
    objective = MaskedLM(classifier, "stage.mlm")
    assert objective.head is not None
    assert classifier.get_input_embeddings().weight is objective._language_model[0].get_output_embeddings().weight  # tied
    loss = objective(classifier, inputs, labels)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and classifier.base_model.encoder.layer[0].attention.self.query.weight.grad is not None
    assert classifier.classifier.weight.grad is None  # the classification head takes no part


# -- bad input ----------------------------------------------------------------------------------


def _refusal(*overrides: str) -> str:
    from effitrain.cli import precheck

    with pytest.raises(ConfigError) as caught:
        precheck([*TINY, *overrides])
    return str(caught.value)


def test_bad_learning_technique_settings_are_refused_before_any_work() -> None:
    assert _refusal("data.mix={kind: mixup, alpha: 0}") == \
        "data.mix.alpha = 0 is not allowed (allowed: a number > 0, the Beta(alpha, alpha) concentration)"
    assert _refusal("data.mix={kind: cutmix, prob: 1.5}") == "data.mix.prob = 1.5 is not allowed (allowed: a probability in [0, 1])"
    assert _refusal("data.mix={kind: blend}") == "data.mix.kind = 'blend' is not allowed (allowed: none, mixup, cutmix, both)"
    assert _refusal("data.label_fraction=0") == "data.label_fraction = 0 is not allowed (allowed: a fraction in (0, 1])"
    assert _refusal("data.label_fraction=1.5") == "data.label_fraction = 1.5 is not allowed (allowed: a fraction in (0, 1])"
    assert _refusal("+stage@stage.pre=pretrain").startswith(
        "stage.pre.views: SimCLR learns from two random views of each image and none is defined (views is null and data.augment is empty)")
    assert _refusal("+stage@stage.pre=pretrain", "stage.pre.method=mlm") == (
        "stage.pre.method = 'mlm' needs text data with a tokenizer (data.tokenizer); data 'effitrain.data.synthetic.build_synthetic' "
        "has none (allowed: simclr, auto)")
    assert _refusal("+stage@stage.pre=pretrain", "stage.pre.temperature=0") == "stage.pre.temperature = 0.0 is not allowed (allowed: a number > 0)"
    # names of the model's modules, checked on the recipe's model before any stage runs
    views = "stage.pre.views=[{_target_: torchvision.transforms.v2.RandomAffine, degrees: 5}]"
    assert _refusal("+stage@stage.pre=pretrain", "stage.pre.head=decoder", "objective.0.stage=train", views).startswith(
        "stage.pre.head = 'decoder': no such module in MLP (allowed: auto, or one of layers, layers.0")
    assert _refusal("stage.train.freeze=[encoder]") == \
        "stage.train.freeze: pattern 'encoder' matches no module with parameters (top-level modules: layers)"


def test_mixing_text_is_refused(workdir: Path) -> None:
    (workdir / "texts.csv").write_text("text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(40)))
    result = run_cli("run", "recipe=baseline", "model=bert", "data=text", "data.path=texts.csv", "data.num_classes=2",
                     "+data.mix={kind: mixup}", cwd=workdir)
    assert_refused(result, "data.mix = 'mixup': Mixup and CutMix mix images; data 'effitrain.data.text.build_text' is text "
                           "(allowed: data.mix=null)", workdir)


def test_pretrain_without_an_encoder_it_can_find_and_too_few_labels(workdir: Path) -> None:
    views = "stage.pre.views=[{_target_: torchvision.transforms.v2.RandomAffine, degrees: 10}]"
    result = run_cli("run", "recipe=baseline", "data=synthetic", "~model", "+model={_target_: userplugins.ConvHeadNet, num_classes: 4}",
                     "+stage@stage.pre=pretrain", views, "objective.0.stage=train", "measure.repeats=10", "report=false",
                     cwd=workdir, user_code=True)
    assert_refused(result, "error: stage.pre.head = 'auto': found no encoder in ConvHeadNet: looked for a transformers base "
                           "model, a child module named classifier, fc, head, and a Linear layer with 4 outputs (allowed: "
                           "the name of the module whose input is the representation)", workdir)  # before train and evaluate ran
    few = run_cli("run", *TINY, "data.label_fraction=0.005", cwd=workdir)
    assert_refused(few, "data.label_fraction = 0.005 keeps no label of class", workdir)  # the labels are read before any folder
