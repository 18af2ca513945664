"""Text classification tables: CSV or JSONL files with a text column and a label column.

This module reads and checks the files; turning text into model inputs (a tokenizer) is the
job of the NLP data builder that the distillation work adds on top of it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from effitrain.errors import DataError


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
