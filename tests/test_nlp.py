"""The Hugging Face path: offline model and tokenizer loading, text data, and distill_bert end to end
on a tiny BERT saved to a local folder (the real MiniLM recipe runs by hand and in the closing note)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from effitrain.data.text import build_bbcnews, build_text, read_bbcnews
from effitrain.errors import ConfigError
from effitrain.models.hf import hf_classifier, load_tokenizer, resolve_pretrained

from conftest import read_summary, run_cli, run_dirs


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 6-layer, 32-wide BERT with MiniLM's tokenizer, saved as a local model folder."""
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    minilm = Path(resolve_pretrained("minilm"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> str:
    """30 articles of each BBC News class, their first 400 characters: the recipes' data path at a
    size the suite can afford (`data.root`)."""
    folder = tmp_path_factory.mktemp("bbc_small")
    table = read_bbcnews()
    for name in table.label_names:
        (folder / name).mkdir()
    counts = {name: 0 for name in table.label_names}
    for text, label in zip(table.texts, table.labels):
        name = table.label_names[label]
        if counts[name] < 30:
            (folder / name / f"{counts[name]:03d}.txt").write_text(text[:400], encoding="utf-8")
            counts[name] += 1
    return str(folder)


FAST = ["measure.repeats=10", "measure.warmup=1", "measure.final_retime=false", "report=false"]


def test_packaged_minilm_resolves_to_a_local_folder() -> None:
    folder = Path(resolve_pretrained("minilm"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_hub_names_fail_fast_and_clearly_offline() -> None:
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"model.pretrained = 'no-such-org/no-such-model': not a local folder .* downloads are off"):
        hf_classifier("no-such-org/no-such-model", 3)
    with pytest.raises(ConfigError, match=r"data.tokenizer = 'no-such-org/no-such-model': not a local folder"):
        load_tokenizer("no-such-org/no-such-model")
    assert time.perf_counter() - started < 30  # no network retries


def test_local_folder_model_and_overrides(tiny_bert_dir) -> None:
    model = hf_classifier(str(tiny_bert_dir), 5)
    assert model.config.num_labels == 5 and len(model.bert.encoder.layer) == 6
    smaller = hf_classifier(str(tiny_bert_dir), 5, config={"num_hidden_layers": 2})
    assert len(smaller.bert.encoder.layer) == 2
    with pytest.raises(ConfigError, match="model.config.nope: no such setting"):
        hf_classifier(str(tiny_bert_dir), 5, config={"nope": 1})


def test_bbcnews_corpus_is_read_from_the_package() -> None:
    table = read_bbcnews()
    assert len(table.texts) == 2225 and len(table.label_names) == 5
    assert all(text for text in table.texts)


def test_text_table_is_tokenised_and_split(tmp_path) -> None:
    rows = ["text,label"] + [f"story number {i} about {'sport' if i % 2 else 'money'},{'sport' if i % 2 else 'business'}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    data = build_text(str(tmp_path / "t.csv"), "minilm", num_classes=2, max_length=16, batch_size=4)
    inputs, labels = next(iter(data.train))
    assert inputs["input_ids"].shape == (4, 16) and inputs["attention_mask"].shape == (4, 16)
    assert len(data.train.dataset) + len(data.val.dataset) + len(data.test.dataset) == 40
    with pytest.raises(ConfigError, match=r"data.num_classes = 3 but the data has 2 labels \(business, sport\)"):
        build_text(str(tmp_path / "t.csv"), "minilm", num_classes=3, max_length=16)


def test_bbcnews_split_is_fixed() -> None:
    first, second = build_bbcnews("minilm", max_length=8), build_bbcnews("minilm", max_length=8)
    assert first.test.dataset.indices == second.test.dataset.indices
    assert len(first.test.dataset) == 334


def test_distill_bert_recipe_end_to_end_on_a_tiny_bert(tiny_bert_dir, small_corpus, workdir) -> None:
    result = run_cli(
        "run", "recipe=distill_bert", f"model.pretrained={tiny_bert_dir}", f"data.root={small_corpus}", "data.max_length=16",
        "data.input_shape=[16]", "trainer.max_epochs=1", "optimizer.lr=1e-3", *FAST, cwd=workdir, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_dirs(workdir)
    summary = read_summary(run_dir)
    rows = {row["name"]: row["metrics"] for row in summary["stages"]}
    assert list(rows) == ["teacher", "student", "int8"]
    assert rows["student"]["params"] < rows["teacher"]["params"]
    # the recipe trims the student's vocabulary to the training split's tokens
    assert 200 < rows["student"]["vocab_kept"] < rows["student"]["vocab_size"] == 30522
    assert rows["student"]["teacher_accuracy"] == [pytest.approx(rows["teacher"]["accuracy"])]
    assert (run_dir / "predictions" / "student.json").is_file()
    # the student as a Hugging Face folder, the int8 stage as ONNX with the tokenizer beside it
    exported = run_cli("export", f"{run_dir}:student", "--format", "hf", "-o", "student_hf", cwd=workdir, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "agreement 1.0000" in exported.stdout
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(workdir / "student_hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "student_hf")
    assert model.config.num_hidden_layers == 3 and model.num_parameters() == rows["student"]["params"]
    encoded = tokenizer(["Shares in the bank rose after profits beat forecasts."], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert model(**encoded).logits.shape == (1, 5)
    record = json.loads((workdir / "student_hf" / "export.json").read_text())
    assert record["agreement"] == 1.0 and record["test_accuracy"] == pytest.approx(rows["student"]["accuracy"])
    # a plain transformers model of the kept rows, and a tokenizer that emits their ids
    assert record["vocab_kept"] == rows["student"]["vocab_kept"] == model.config.vocab_size == len(tokenizer)
    assert int(encoded["input_ids"].max()) < model.config.vocab_size
    int8 = run_cli("export", f"{run_dir}:int8", "--format", "onnx", "-o", "int8.onnx", cwd=workdir, timeout=300)
    assert int8.returncode == 0, int8.stderr[-3000:]
    record = json.loads((workdir / "int8.export.json").read_text())
    assert record["inputs"] == ["input_ids", "attention_mask"] and record["agreement"] >= 0.999
    assert AutoTokenizer.from_pretrained(workdir / "int8.tokenizer")("hello")["input_ids"]


def test_bert_heads_and_ffn_neurons_are_pruned_physically(tiny_bert_dir, small_corpus, workdir) -> None:
    result = run_cli(
        "run", "recipe=prune_bert", f"model.pretrained={tiny_bert_dir}", f"data.root={small_corpus}", "data.max_length=16",
        "data.input_shape=[16]", "trainer.max_epochs=1", *FAST, "hydra.run.dir=run", cwd=workdir, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row["metrics"] for row in read_summary(workdir / "run")["stages"]}
    assert list(rows) == ["teacher", "student", "pruned", "evaluate"]
    assert rows["pruned"]["params"] < rows["student"]["params"]
    layers = {row["layer"]: row["shape"] for row in __import__("json").loads((workdir / "run" / "pruning" / "pruned.json").read_text())}
    assert layers["bert.encoder.layer.0.attention.self.query"] == [16, 32]  # 1 of 2 heads left (head size 16)
    assert layers["bert.encoder.layer.0.intermediate.dense"] == [32, 32]    # 64 -> 32 FFN neurons
    assert layers["bert.encoder.layer.0.output.dense"] == [32, 32]          # residual width kept
    # transformers 5 has no `pruned_heads`: a head-pruned BERT goes to ONNX, not to a transformers folder
    refused = run_cli("export", "run:pruned", "--format", "hf", cwd=workdir, timeout=300)
    assert refused.returncode == 2 and "pruned attention heads ([1, 1, 1] per layer of 2)" in refused.stderr
    assert "(allowed for this model: onnx, torchscript, safetensors)" in refused.stderr
    exported = run_cli("export", "run:pruned", "-o", "pruned.onnx", cwd=workdir, timeout=300)
    assert exported.returncode == 0 and "agreement 1.0000" in exported.stdout, exported.stderr[-3000:]


def test_structured_bert_pruning_reloads_the_saved_shapes(tmp_path_factory, small_corpus, workdir) -> None:
    """taylor saliency + global distribution + iterative rounds leave per-layer head and FFN
    counts no re-pruning could guess; the reload reads them from the saved file."""
    from transformers import BertConfig, BertForSequenceClassification

    from effitrain.precision import build_precision
    from effitrain.runs import load_run_model
    from effitrain.tasks import Classification

    folder = tmp_path_factory.mktemp("bert4")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                                             intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    minilm = Path(resolve_pretrained("minilm"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    result = run_cli(
        "run", "recipe=prune_bert", f"model.pretrained={folder}", f"data.root={small_corpus}", "data.max_length=16",
        "data.input_shape=[16]", "trainer.max_epochs=1", *FAST, "stage.pruned.saliency=taylor",
        "stage.pruned.distribution=global", "stage.pruned.schedule=iterative", "stage.pruned.rounds=2", "stage.pruned.saliency_batches=2",
        "~stage.evaluate", "hydra.run.dir=run", cwd=workdir, timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row["metrics"] for row in read_summary(workdir / "run")["stages"]}
    saved = {row["layer"]: row["shape"] for row in __import__("json").loads((workdir / "run" / "pruning" / "pruned.json").read_text())}
    model, data = load_run_model(workdir / "run", "pruned")
    shapes = {name: list(module.weight.shape) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert shapes == saved
    for index, layer in enumerate(model.bert.encoder.layer):
        attention = layer.attention.self
        assert attention.num_attention_heads * attention.attention_head_size == saved[f"bert.encoder.layer.{index}.attention.self.query"][0]
    scores = Classification().evaluate(model, data.test, build_precision("fp32", torch.device("cpu")), keep_predictions=True)
    assert scores["accuracy"] == rows["pruned"]["accuracy"]
    assert scores["predictions"] == __import__("json").loads((workdir / "run" / "predictions" / "pruned.json").read_text())["predictions"]
