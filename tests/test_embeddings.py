"""Smaller word embeddings: vocabulary trimming (same predictions on kept tokens, [UNK] for the
rest, a tokenizer that emits the kept rows' ids) and SVD-factorised embeddings."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from effitrain.compress.embeddings import (
    TrimmedEmbedding, factorize_embeddings, kept_ids, token_ids, trim_tokenizer_file, trim_vocabulary,
)
from effitrain.errors import ConfigError

from conftest import run_cli

UNK = 3


def tiny_bert(vocab: int = 60):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=16, pad_token_id=0, num_labels=3)
    return BertForSequenceClassification(config).eval()


def batch(ids: list[list[int]]) -> dict[str, torch.Tensor]:
    tensor = torch.tensor(ids)
    return {"input_ids": tensor, "attention_mask": (tensor != 0).long()}


def test_trimmed_model_predicts_exactly_as_untrimmed_on_kept_tokens() -> None:
    model = tiny_bert()
    trimmed = copy.deepcopy(model)
    kept = [0, 5, 7, 9, 11, 40, 41]
    facts = trim_vocabulary(trimmed, kept, UNK, "stage.s.vocab")
    assert facts == {"vocab_kept": 8, "vocab_size": 60}  # the kept tokens and [UNK]
    layer = trimmed.bert.embeddings.word_embeddings
    assert isinstance(layer, TrimmedEmbedding) and layer.rows.weight.shape == (8, 16) and layer.rows.padding_idx == 0
    inputs = batch([[5, 7, 9, 0], [40, 41, 11, 5]])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, trimmed(**inputs).logits)
        # a token that was not kept reads as [UNK]
        assert torch.equal(trimmed(**batch([[5, 50, 9, 0]])).logits, model(**batch([[5, UNK, 9, 0]])).logits)
    assert sum(p.numel() for p in trimmed.parameters()) == sum(p.numel() for p in model.parameters()) - 52 * 16
    assert kept_ids(layer, UNK).tolist() == [0, UNK, 5, 7, 9, 11, 40, 41]


def test_trimmed_model_saves_and_reloads_through_its_state_dict() -> None:
    model = tiny_bert()
    trim_vocabulary(model, [0, 5, 7], UNK, "v")
    again = tiny_bert()
    trim_vocabulary(again, [0, 5, 7], UNK, "v")
    torch.nn.init.zeros_(again.bert.embeddings.word_embeddings.rows.weight)
    again.load_state_dict(model.state_dict())
    inputs = batch([[5, 7, 59]])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)
    assert again.bert.embeddings.word_embeddings.remap.dtype == torch.int32


def test_factorised_embeddings_are_the_svd_approximation_and_check_the_rank() -> None:
    model = tiny_bert()
    full = model.bert.embeddings.word_embeddings.weight.detach().clone()
    assert factorize_embeddings(model, 4, "stage.s.embedding_rank") == {"embedding_rank": 4}
    rows, project = model.bert.embeddings.word_embeddings
    product = rows.weight @ project.weight.T
    u, s, vh = torch.linalg.svd(full, full_matrices=False)
    assert torch.allclose(product, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)
    with pytest.raises(ConfigError, match=r"stage.s.embedding_rank = 16: does not make the 60 x 16 table smaller \(allowed: 1..12\)"):
        factorize_embeddings(tiny_bert(), 16, "stage.s.embedding_rank")
    trimmed = tiny_bert()
    trim_vocabulary(trimmed, range(20), UNK, "v")
    factorize_embeddings(trimmed, 4, "r")  # trimmed, then factorised: the kept rows are factorised
    assert trimmed.bert.embeddings.word_embeddings.rows[0].weight.shape == (20, 4)
    with pytest.raises(ConfigError, match="trim before factorising"):
        trim_vocabulary(model, [1], UNK, "v")


def test_token_ids_and_non_text_inputs() -> None:
    assert token_ids([{"input_ids": torch.tensor([[4, 2, 2]])}, {"input_ids": torch.tensor([[9, 4]])}], "v").tolist() == [2, 4, 9]
    with pytest.raises(ConfigError, match=r"stage.s.vocab: vocabulary trimming needs tokenised text inputs"):
        token_ids([torch.zeros(2, 3)], "stage.s.vocab")
    with pytest.raises(ConfigError, match="has no word embeddings"):
        trim_vocabulary(torch.nn.Linear(2, 2), [1], 0, "v")


def test_trimmed_tokenizer_emits_kept_rows_and_matches_on_kept_texts(tmp_path) -> None:
    from transformers import AutoTokenizer

    from effitrain.models.hf import load_tokenizer

    tokenizer = load_tokenizer("minilm")
    corpus = ["Shares in the bank rose after profits beat forecasts.", "The striker scored twice in the cup final."]
    seen = {index for text in corpus for index in tokenizer(text)["input_ids"]}
    model = tiny_bert(vocab=tokenizer.vocab_size)
    trim_vocabulary(model, [*seen, *tokenizer.all_special_ids], tokenizer.unk_token_id, "v")
    layer = model.bert.embeddings.word_embeddings
    tokenizer.save_pretrained(tmp_path)
    trim_tokenizer_file(tmp_path / "tokenizer.json", layer, tokenizer.unk_token_id)
    trimmed = AutoTokenizer.from_pretrained(tmp_path)
    assert len(trimmed) == layer.rows.num_embeddings
    for text in ["the bank scored twice.", corpus[0]]:  # every piece kept: the same tokens, as kept rows
        original = torch.tensor(tokenizer(text)["input_ids"])
        assert trimmed(text)["input_ids"] == layer.remap[original].tolist()
    assert trimmed.convert_ids_to_tokens(trimmed("shares rose")["input_ids"]) == ["[CLS]", "shares", "rose", "[SEP]"]
    assert max(trimmed("an unseen word: photosynthesis")["input_ids"]) < layer.rows.num_embeddings
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(ConfigError, match="needs a WordPiece tokenizer to trim; this one is 'BPE'"):
        trim_tokenizer_file(tmp_path / "tokenizer.json", layer, tokenizer.unk_token_id)


def test_vocab_settings_are_checked_before_any_work(workdir) -> None:
    bad = run_cli("run", "recipe=quickstart", "stage.student.vocab=trim", cwd=workdir, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "stage.student.vocab = 'trim': needs text data with a tokenizer (data.tokenizer)" in bad.stderr
    wrong = run_cli("run", "recipe=quickstart", "stage.student.vocab=half", cwd=workdir, timeout=120)
    assert wrong.returncode == 2 and "stage.student.vocab = 'half'" in wrong.stderr and "full, trim" in wrong.stderr
    rank = run_cli("run", "recipe=quickstart", "stage.student.embedding_rank=0", cwd=workdir, timeout=120)
    assert rank.returncode == 2 and "stage.student.embedding_rank = 0" in rank.stderr
    assert not list(workdir.glob("outputs/*/*/checkpoints/*"))
