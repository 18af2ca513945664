"""The `DataBundle` every builder returns, and the shared split/loader/augmentation helpers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from effitrain.batch import batch_size as count_of
from effitrain.errors import ConfigError, require


@dataclass
class DataBundle:
    """Train/val/test loaders plus what models need to know about the inputs.

    Attributes:
        train: shuffled loader (a `SeededShuffle` sampler: same order for the same seed and epoch).
        val: loader for model selection (best checkpoint, early stopping).
        test: loader for the ledger's accuracy.
        num_classes: number of labels.
        input_shape: shape of one input without the batch dimension.
        unlabeled: the whole training split when `data.label_fraction` < 1 keeps only some of
            its labels for `train` (None: `train` is the whole split); stages that do not read
            labels (pre-training) learn from it.
    """

    train: DataLoader
    val: DataLoader
    test: DataLoader
    num_classes: int
    input_shape: tuple[int, ...]
    unlabeled: DataLoader | None = None

    @property
    def every_train(self) -> DataLoader:
        """Every training example, labelled or not (labels are not to be read from it)."""
        return self.unlabeled if self.unlabeled is not None else self.train

    def example_batch(self, batch_size: int, split: Callable[[Any], tuple[Any, Any]] = lambda batch: batch) -> Any:
        """Return `batch_size` test inputs (cycled if the split is smaller), for tracing and timing.

        Args:
            split: turns a loader's batch into (inputs, targets) (the task's `split`).
        """
        inputs = []
        count = 0
        while count < batch_size:
            for batch in self.test:
                batch_inputs, _ = split(batch)
                inputs.append(batch_inputs)
                count += count_of(batch_inputs)
                if count >= batch_size:
                    break
        if isinstance(inputs[0], dict):  # tokenised text
            return {key: torch.cat([item[key] for item in inputs])[:batch_size] for key in inputs[0]}
        return torch.cat(inputs)[:batch_size]


class SeededShuffle(Sampler[int]):
    """Shuffles with a permutation that depends only on (seed, epoch), like DistributedSampler.

    The trainer calls `set_epoch` before each epoch, so a resumed run sees the same order as
    an uninterrupted one.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class _Transformed(Dataset):
    """Applies `transform` to the input of each (input, label) pair of `dataset`."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        inputs, label = self.dataset[index]
        return self.transform(inputs), label


def build_augment(augment: Sequence[Any] | None) -> Callable | None:
    """Build a torchvision transforms-v2 pipeline from a list of `_target_` configs (or None)."""
    if not augment:
        return None
    from hydra.utils import instantiate
    from torchvision.transforms import v2

    try:
        return v2.Compose([instantiate(item) for item in augment])
    except Exception as error:  # instantiate wraps import and argument errors alike
        raise ConfigError(f"data.augment: cannot build transform ({str(error).splitlines()[0]})") from None


def split_indices(
    labels: Sequence[int], val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split example indices into train/val/test, stratified by label and fixed by `seed`.

    Args:
        labels: one label per example.
        val_fraction: fraction of examples for validation, in (0, 1).
        test_fraction: fraction of examples for test, in (0, 1).
        seed: the split's random seed (independent of the training seed).

    Returns:
        Index arrays (train, val, test).
    """
    for key, value in (("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)):
        require(0 < value < 1, key, value, "a number in (0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no "
            "training data (allowed: a sum < 1)"
        )
    train_and_val, test = split_two(labels, test_fraction, seed)
    labels = np.asarray(labels)
    train, val = split_two(labels[train_and_val], val_fraction / (1 - test_fraction), seed)
    return train_and_val[train], train_and_val[val], test


def split_two(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of `labels` into (rest, held-out `fraction`), stratified when every class has 3+.

    Returns:
        Sorted index arrays (rest, held_out).
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    stratify = labels if len(labels) and np.bincount(labels).min() >= 3 else None
    rest, held_out = train_test_split(
        np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=stratify
    )
    return np.sort(rest), np.sort(held_out)


def make_bundle(
    train: Dataset,
    val: Dataset,
    test: Dataset,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    batch_size: int,
    eval_batch_size: int,
    num_workers: int,
    shuffle_seed: int,
    augment: Sequence[Any] | None = None,
) -> DataBundle:
    """Wrap three datasets in loaders; augmentation applies to the training split only."""
    require(eval_batch_size >= 1, "data.eval_batch_size", eval_batch_size, "an integer >= 1")
    require(num_workers >= 0, "data.num_workers", num_workers, "an integer >= 0")
    transform = build_augment(augment)
    if transform is not None:
        train = _Transformed(train, transform)
    common = {"num_workers": num_workers, "persistent_workers": num_workers > 0}
    return DataBundle(
        train=DataLoader(train, batch_size=batch_size, sampler=SeededShuffle(len(train), shuffle_seed), **common),  # type: ignore[arg-type]
        val=DataLoader(val, batch_size=eval_batch_size, **common),
        test=DataLoader(test, batch_size=eval_batch_size, **common),
        num_classes=num_classes,
        input_shape=tuple(input_shape),
    )


def subsets(dataset: Dataset, splits: tuple[np.ndarray, ...]) -> list[Subset]:
    """Return one `Subset` of `dataset` per index array."""
    return [Subset(dataset, split.tolist()) for split in splits]
