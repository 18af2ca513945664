"""scikit-learn's handwritten digits: 1,797 real 8x8 grey images in 10 classes, shipped offline."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import TensorDataset

from effitrain.data.bundle import DataBundle, make_bundle, split_indices
from effitrain.errors import ConfigError


def build_digits(
    batch_size: int = 64,
    eval_batch_size: int = 256,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    shuffle_seed: int = 0,
    num_workers: int = 0,
    num_classes: int = 10,
    input_shape: Sequence[int] = (1, 8, 8),
    augment: Sequence[Any] | None = None,
) -> DataBundle:
    """Load the digits as tensors in [0, 1] of shape (1, 8, 8), split stratified by `split_seed`.

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test.
        val_fraction: fraction of images for validation.
        test_fraction: fraction of images for test.
        split_seed: fixes the split (kept apart from the training seed so sweeps compare alike).
        shuffle_seed: fixes the training order per epoch.
        num_workers: DataLoader worker processes.
        num_classes: must be 10 (declared so models can read it from the config).
        input_shape: must be [1, 8, 8] (declared so models can read it from the config).
        augment: transforms-v2 configs applied to training images.

    Returns:
        The seeded train/val/test bundle.
    """
    from sklearn.datasets import load_digits

    if num_classes != 10 or tuple(input_shape) != (1, 8, 8):
        raise ConfigError(
            f"data: digits has 10 classes of shape [1, 8, 8], got num_classes={num_classes}, "
            f"input_shape={list(input_shape)} (allowed: leave them at their defaults)"
        )
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    splits = split_indices(digits.target, val_fraction, test_fraction, split_seed)
    train, val, test = (TensorDataset(images[index], labels[index]) for index in splits)
    return make_bundle(
        train, val, test,
        num_classes=10, input_shape=(1, 8, 8), batch_size=batch_size, eval_batch_size=eval_batch_size,
        num_workers=num_workers, shuffle_seed=shuffle_seed, augment=augment,
    )
