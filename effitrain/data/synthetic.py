"""Seeded synthetic classification data for tests: Gaussian blobs around one mean per class."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import TensorDataset

from effitrain.data.bundle import DataBundle, make_bundle, split_indices
from effitrain.errors import require


def build_synthetic(
    num_samples: int = 512,
    num_classes: int = 4,
    input_shape: Sequence[int] = (1, 8, 8),
    noise: float = 1.0,
    data_seed: int = 0,
    batch_size: int = 32,
    eval_batch_size: int = 128,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    shuffle_seed: int = 0,
    num_workers: int = 0,
    augment: Sequence[Any] | None = None,
) -> DataBundle:
    """Draw `num_samples` inputs as class mean + `noise` x N(0, 1); learnable, yet not trivially.

    Args:
        num_samples: total examples before the split.
        num_classes: number of classes (>= 2).
        input_shape: shape of one input.
        noise: standard deviation around each class mean (means are N(0, 1) per element).
        data_seed: fixes the means and the samples.
        batch_size, eval_batch_size, val_fraction, test_fraction, split_seed, shuffle_seed,
        num_workers, augment: as for `build_digits`.

    Returns:
        The seeded train/val/test bundle.
    """
    require(num_classes >= 2, "data.num_classes", num_classes, "an integer >= 2")
    require(num_samples >= 10 * num_classes, "data.num_samples", num_samples, f">= 10 x num_classes = {10 * num_classes}")
    generator = torch.Generator().manual_seed(data_seed)
    means = torch.randn(num_classes, *input_shape, generator=generator)
    labels = torch.arange(num_samples) % num_classes
    inputs = means[labels] + noise * torch.randn(num_samples, *input_shape, generator=generator)
    splits = split_indices(labels.numpy(), val_fraction, test_fraction, split_seed)
    train, val, test = (TensorDataset(inputs[index], labels[index]) for index in splits)
    return make_bundle(
        train, val, test,
        num_classes=num_classes, input_shape=input_shape, batch_size=batch_size,
        eval_batch_size=eval_batch_size, num_workers=num_workers, shuffle_seed=shuffle_seed, augment=augment,
    )
