"""Data builders: seeded splits, digits, image folders, text tables, clear errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from effitrain.data import split_indices
from effitrain.data.digits import build_digits
from effitrain.data.synthetic import build_synthetic
from effitrain.data.text import read_text_table
from effitrain.data.vision import build_image_folder, build_torchvision_dataset
from effitrain.errors import ConfigError, DataError


def test_split_is_disjoint_complete_stratified_and_seeded() -> None:
    labels = np.repeat(np.arange(5), 40)
    train, val, test = split_indices(labels, 0.2, 0.2, seed=0)
    assert len(set(train) | set(val) | set(test)) == 200 and len(train) + len(val) + len(test) == 200
    assert np.bincount(labels[test]).tolist() == [8] * 5
    again = split_indices(labels, 0.2, 0.2, seed=0)
    assert all((a == b).all() for a, b in zip((train, val, test), again))
    assert not (split_indices(labels, 0.2, 0.2, seed=1)[2] == test).all()


def test_digits_are_real_and_split() -> None:
    bundle = build_digits(batch_size=32)
    sizes = [len(loader.dataset) for loader in (bundle.train, bundle.val, bundle.test)]
    assert sum(sizes) == 1797 and bundle.num_classes == 10 and bundle.input_shape == (1, 8, 8)
    inputs, labels = next(iter(bundle.train))
    assert inputs.shape == (32, 1, 8, 8) and 0.0 <= inputs.min() and inputs.max() <= 1.0
    assert bundle.example_batch(600).shape[0] == 600  # cycles the 270-image test split


def test_augment_applies_to_train_only() -> None:
    augment = [{"_target_": "torchvision.transforms.v2.RandomErasing", "p": 1.0, "value": 0.0}]
    plain, augmented = build_synthetic(), build_synthetic(augment=augment)
    assert not torch.equal(augmented.train.dataset[0][0], plain.train.dataset[0][0])
    assert torch.equal(augmented.test.dataset[0][0], plain.test.dataset[0][0])


def test_bad_augment_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="data.augment"):
        build_synthetic(augment=[{"_target_": "torchvision.transforms.v2.NoSuchThing"}])


def test_image_folder_reads_classes_and_checks_count(tmp_path: Path) -> None:
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for index in range(10):
            Image.new("RGB", (12, 10), color=(index * 20, 0, 0)).save(tmp_path / label / f"{index}.png")
    bundle = build_image_folder(str(tmp_path), num_classes=2, input_shape=(3, 16, 16), val_fraction=0.2, test_fraction=0.2)
    inputs, _ = next(iter(bundle.train))
    assert inputs.shape[1:] == (3, 16, 16)
    with pytest.raises(ConfigError, match="has 2 classes"):
        build_image_folder(str(tmp_path), num_classes=3)
    with pytest.raises(DataError, match="does not exist"):
        build_image_folder(str(tmp_path / "missing"), num_classes=2)


def test_torchvision_dataset_missing_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"CIFAR10 not found under '{tmp_path}'"):
        build_torchvision_dataset("CIFAR10", str(tmp_path), num_classes=10, input_shape=(3, 32, 32))


def test_text_tables_csv_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("body,topic\nhello world,sport\nmarkets fall,business\ngoal!,sport\n")
    table = read_text_table(str(tmp_path / "a.csv"), text_column="body", label_column="topic")
    assert table.label_names == ["business", "sport"] and table.labels == [1, 0, 1]
    (tmp_path / "b.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y", "label": 0}\n')
    assert read_text_table(str(tmp_path / "b.jsonl")).labels == [1, 0]
    with pytest.raises(DataError, match="column 'content' not in"):
        read_text_table(str(tmp_path / "a.csv"), text_column="content")
