"""Training on a fraction of the labels (`data.label_fraction`), the setting where pre-training
pays: a stratified, seeded subset of the training split keeps its labels and trains the
supervised stages; the whole training split stays available, labels unread, to `pretrain`."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from effitrain.data.bundle import DataBundle, SeededShuffle
from effitrain.errors import ConfigError


def dataset_labels(dataset: Dataset) -> list[int]:
    """The integer label of every example of a dataset, read without loading inputs where the
    dataset keeps its labels apart (tensors, torchvision's `targets`, tokenised text)."""
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)
        return [labels[index] for index in dataset.indices]
    if isinstance(dataset, TensorDataset):
        return [int(value) for value in dataset.tensors[1].tolist()]
    for attribute in ("targets", "labels"):
        values = getattr(dataset, attribute, None)
        if values is not None and len(values) == len(dataset):  # type: ignore[arg-type]
            return [int(value) for value in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    inner = getattr(dataset, "dataset", None)
    if isinstance(inner, Dataset) and len(inner) == len(dataset):  # type: ignore[arg-type]  # a transform wrapper
        return dataset_labels(inner)
    return [int(dataset[index][1]) for index in range(len(dataset))]  # type: ignore[arg-type]


def labelled_subset(labels: Sequence[int], fraction: float, seed: int, where: str = "data.label_fraction") -> np.ndarray:
    """round(n_c x fraction) seeded picks from each class c: the examples that keep their labels.

    Raises:
        ConfigError: the fraction is outside (0, 1], or leaves a class with no label (naming the
            smallest fraction that keeps one of each).
    """
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"{where} = {fraction!r} is not allowed (allowed: a fraction in (0, 1])")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    generator = np.random.default_rng(seed)
    kept = []
    for label, count in zip(classes, counts):
        keep = math.floor(count * fraction + 0.5)
        if keep == 0:
            smallest = 0.5 / counts.min()
            raise ConfigError(f"{where} = {fraction} keeps no label of class {label} ({count} training examples) "
                              f"(allowed: a fraction >= {math.ceil(smallest * 10000) / 10000:.4f}, which keeps one label of every class)")
        members = np.flatnonzero(labels == label)
        kept.append(np.sort(generator.choice(members, size=keep, replace=False)))
    return np.sort(np.concatenate(kept))


def keep_labels(bundle: DataBundle, fraction: float, seed: int) -> DataBundle:
    """The bundle with its training loader cut to the labelled subset; `unlabeled` keeps the whole
    training split (its loader as it was), for stages that do not read labels."""
    if fraction == 1:
        return bundle
    loader = bundle.train
    if not isinstance(loader, DataLoader) or not isinstance(loader.sampler, SeededShuffle):
        raise ConfigError(f"data.label_fraction: the training data is a {type(loader).__name__} without effitrain's SeededShuffle "
                          "sampler (allowed: 1, or a DataLoader as effitrain.data.make_bundle builds it)")
    kept = labelled_subset(dataset_labels(loader.dataset), fraction, seed)
    subset = Subset(loader.dataset, kept.tolist())
    labelled: Any = DataLoader(subset, batch_size=loader.batch_size, sampler=SeededShuffle(len(subset), loader.sampler.seed),
                               collate_fn=loader.collate_fn, num_workers=loader.num_workers, persistent_workers=loader.num_workers > 0)
    bundle.unlabeled = loader
    bundle.train = labelled
    return bundle
