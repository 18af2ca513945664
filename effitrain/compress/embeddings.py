"""Smaller word embeddings for transformer students.

Most of a small BERT's parameters are its word embeddings (30,522 x 384 = 11.7 M of MiniLM's
22.7 M), and most rows belong to tokens a task's texts never use. Two ways to shrink them,
both applied to the model's input embeddings (`get_input_embeddings()`) and fine-tuned by the
stage that applies them:

- vocabulary trimming keeps the rows of the tokens that occur in the training data plus the
  tokenizer's special tokens; a stored table (`remap`, one entry per original token id) maps
  each original id to its kept row, and tokens that were not kept to the [UNK] row. The model
  still takes the tokenizer's original ids, so raw text, the tokenizer and every export keep
  working unchanged; on texts whose tokens were all kept it computes exactly what the
  untrimmed model computes.
- factorised embeddings replace the V x d table by V x r rows times an r x d projection
  (ALBERT's factorisation), initialised by truncated SVD (the best rank-r approximation).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from effitrain.errors import ConfigError
from effitrain.layers import replace_layers

REMAP_DTYPE = torch.int32  # half the bytes of int64; embedding lookups and ONNX Gather take int32 ids


class TrimmedEmbedding(nn.Module):
    """Word embeddings of a kept vocabulary, looked up by the tokenizer's original ids.

    Attributes:
        rows: the kept rows (an nn.Embedding, or a factorised one), in original-id order.
        remap: original token id -> kept row ([UNK]'s row for tokens that were not kept).
    """

    def __init__(self, rows: nn.Module, remap: Tensor) -> None:
        super().__init__()
        self.rows = rows
        self.register_buffer("remap", remap.to(REMAP_DTYPE))

    @property
    def num_embeddings(self) -> int:
        """The vocabulary it accepts (the tokenizer's), as nn.Embedding says it."""
        return int(self.remap.numel())

    def forward(self, ids: Tensor) -> Tensor:
        return self.rows(self.remap[ids])

    def extra_repr(self) -> str:
        return f"vocabulary={self.num_embeddings}, kept={kept_rows(self)}"


def kept_rows(module: nn.Module) -> int:
    """How many token rows an input-embedding module holds."""
    inner = module.rows if isinstance(module, TrimmedEmbedding) else module
    first = inner[0] if isinstance(inner, nn.Sequential) else inner
    return int(first.num_embeddings)


def input_embeddings(model: nn.Module, where: str) -> tuple[str, nn.Module]:
    """The model's word embeddings and their module name.

    Raises:
        ConfigError: the model has no `get_input_embeddings()` (transformers models have it).
    """
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if callable(getter) else None
    if module is None:
        raise ConfigError(f"{where}: {type(model).__name__} has no word embeddings to shrink (allowed: a transformers model with get_input_embeddings())")
    name = next(name for name, candidate in model.named_modules() if candidate is module)
    return name, module


def token_ids(batches: Iterable[Any], where: str) -> Tensor:
    """The sorted distinct token ids of a loader's inputs ({"input_ids": ...} batches).

    Raises:
        ConfigError: the inputs are not token ids.
    """
    seen: Tensor | None = None
    for inputs in batches:
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        if not isinstance(ids, Tensor):
            raise ConfigError(f"{where}: vocabulary trimming needs tokenised text inputs ({{'input_ids': ...}}), got {type(inputs).__name__}")
        unique = ids.unique()
        seen = unique if seen is None else torch.cat([seen, unique]).unique()
    if seen is None:
        raise ConfigError(f"{where}: the training data is empty; nothing to keep")
    return seen.sort().values.cpu()


def trim_vocabulary(model: nn.Module, keep: Iterable[int], unk_id: int, where: str) -> dict[str, Any]:
    """Keep only the embedding rows of the token ids `keep` (and `unk_id`), in place.

    Returns:
        What was kept, for the ledger: {"vocab_kept": K, "vocab_size": V}.
    """
    name, embedding = input_embeddings(model, where)
    if not isinstance(embedding, nn.Embedding):
        raise ConfigError(f"{where}: the word embeddings are {type(embedding).__name__} (allowed: nn.Embedding; trim before factorising)")
    vocabulary = embedding.num_embeddings
    ids = torch.tensor(sorted({*map(int, keep), int(unk_id)}), dtype=torch.long)
    if ids.numel() == 0 or ids[0] < 0 or ids[-1] >= vocabulary:
        raise ConfigError(f"{where}: token ids outside the embedding table (allowed: 0..{vocabulary - 1}; the tokenizer does not match the model)")
    remap = torch.full((vocabulary,), -1, dtype=torch.long)
    remap[ids] = torch.arange(len(ids))
    remap[remap < 0] = remap[unk_id]
    padding = embedding.padding_idx
    kept_padding = padding is not None and bool((ids == padding).any())
    rows = nn.Embedding(len(ids), embedding.embedding_dim, padding_idx=int(remap[padding]) if kept_padding else None)
    with torch.no_grad():
        rows.weight.copy_(embedding.weight.detach()[ids.to(embedding.weight.device)])
    rows.to(embedding.weight.device)
    # the model still takes the same token ids, so a transformers config's vocab_size stays as it is
    replace_layers(model, [name], lambda _: TrimmedEmbedding(rows, remap).to(embedding.weight.device))
    return {"vocab_kept": len(ids), "vocab_size": vocabulary}


def factorized(embedding: nn.Embedding, rank: int) -> nn.Sequential:
    """Embedding(V, r) then Linear(r, d): the best rank-r approximation of the V x d table (SVD)."""
    weight = embedding.weight.detach().float()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    rows = nn.Embedding(weight.shape[0], rank, padding_idx=embedding.padding_idx)
    project = nn.Linear(rank, weight.shape[1], bias=False)
    with torch.no_grad():
        rows.weight.copy_(u[:, :rank] * s[:rank])
        project.weight.copy_(vh[:rank].T)
    return nn.Sequential(rows, project).to(embedding.weight.device)


def factorize_embeddings(model: nn.Module, rank: int, where: str) -> dict[str, Any]:
    """Factorise the word embeddings (or the kept rows of trimmed ones) at `rank`, in place.

    Returns:
        {"embedding_rank": r} for the ledger.

    Raises:
        ConfigError: a rank that would not make the table smaller.
    """
    name, module = input_embeddings(model, where)
    table = module.rows if isinstance(module, TrimmedEmbedding) else module
    if not isinstance(table, nn.Embedding):
        raise ConfigError(f"{where}: the word embeddings are {type(table).__name__} (allowed: nn.Embedding, trimmed or not)")
    count, width = table.num_embeddings, table.embedding_dim
    largest = count * width // (count + width)
    if not 1 <= rank <= largest or rank >= width:
        raise ConfigError(f"{where} = {rank}: does not make the {count} x {width} table smaller (allowed: 1..{min(largest, width - 1)})")
    if isinstance(module, TrimmedEmbedding):
        module.rows = factorized(table, rank)
    else:
        replace_layers(model, [name], lambda _: factorized(table, rank))
    return {"embedding_rank": rank}


def kept_ids(module: TrimmedEmbedding, unk_id: int) -> Tensor:
    """The original token ids whose rows a trimmed table kept, in row order."""
    remap = module.remap.long().cpu()
    unk_row = remap[unk_id]
    kept = (remap != unk_row).nonzero().flatten()
    return torch.cat([kept, torch.tensor([unk_id])])[torch.argsort(torch.cat([remap[kept], unk_row.view(1)]))]


def trim_tokenizer_file(path: Any, module: TrimmedEmbedding, unk_id: int) -> None:
    """Rewrite a saved tokenizer.json (a `tokenizers` WordPiece model) so it emits kept-row ids.

    WordPiece matches the longest piece in its vocabulary, and the kept vocabulary is a subset,
    so a text whose pieces were all kept is tokenised exactly as before (then remapped); a word
    with a dropped piece is split into kept pieces instead of reading as [UNK].

    Raises:
        ConfigError: not a WordPiece tokenizer (other models' merges or scores do not survive a
            smaller vocabulary).
    """
    import json
    from pathlib import Path

    file = Path(path)
    state = json.loads(file.read_text(encoding="utf-8"))
    model = state.get("model") or {}
    if model.get("type") != "WordPiece":
        raise ConfigError(f"export: a trimmed vocabulary needs a WordPiece tokenizer to trim; this one is {model.get('type')!r} (allowed formats: onnx, torchscript, safetensors, which keep the tokenizer and the remap table)")
    remap = module.remap.long().cpu()
    order = kept_ids(module, unk_id).tolist()
    tokens = {index: token for token, index in model["vocab"].items()}
    model["vocab"] = {tokens[index]: row for row, index in enumerate(order)}
    for added in state.get("added_tokens") or []:
        added["id"] = int(remap[added["id"]])
    processor = state.get("post_processor") or {}
    for special in (processor.get("special_tokens") or {}).values():  # TemplateProcessing
        special["ids"] = [int(remap[index]) for index in special["ids"]]
    for key in ("cls", "sep"):  # BertProcessing
        if isinstance(processor.get(key), list):
            processor[key][1] = int(remap[processor[key][1]])
    if state.get("padding"):
        state["padding"]["pad_id"] = int(remap[state["padding"]["pad_id"]])
    file.write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    config = file.with_name("tokenizer_config.json")
    if config.is_file():
        settings = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(settings.get("added_tokens_decoder"), dict):
            settings["added_tokens_decoder"] = {str(int(remap[int(index)])): token for index, token in settings["added_tokens_decoder"].items()}
            config.write_text(json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8")
    vocab_txt = file.with_name("vocab.txt")
    if vocab_txt.is_file():  # the slow tokenizer's vocabulary, one token per line in id order
        vocab_txt.write_text("".join(tokens[index] + "\n" for index in order), encoding="utf-8")
