"""Images from disk: a class-per-folder tree (ImageFolder) or a torchvision dataset in a local root.

Nothing here downloads unless the config says `download: true`; offline, a missing dataset
fails with the path it looked in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from effitrain.data.bundle import DataBundle, make_bundle, split_indices, split_two, subsets
from effitrain.errors import ConfigError, DataError, not_allowed, require_choice

TORCHVISION_DATASETS = ("MNIST", "FashionMNIST", "CIFAR10", "CIFAR100")


def _image_transform(input_shape: Sequence[int], mean: Sequence[float] | None, std: Sequence[float] | None) -> Any:
    from torchvision.transforms import v2
    import torch

    channels, height, width = input_shape
    steps = [v2.ToImage()]
    if channels == 1:
        steps.append(v2.Grayscale(1))
    elif channels == 3:
        steps.append(v2.RGB())
    else:
        raise not_allowed("data.input_shape", list(input_shape), "1 or 3 channels first")
    steps += [v2.Resize((height, width), antialias=True), v2.ToDtype(torch.float32, scale=True)]
    if mean is not None and std is not None:
        steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def _check_classes(found: int, declared: int, where: str) -> None:
    if found != declared:
        raise ConfigError(
            f"data.num_classes = {declared} but {where} has {found} classes (allowed: set data.num_classes={found})"
        )


def build_image_folder(
    root: str,
    num_classes: int,
    input_shape: Sequence[int] = (3, 32, 32),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 64,
    eval_batch_size: int = 256,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    shuffle_seed: int = 0,
    num_workers: int = 0,
    augment: Sequence[Any] | None = None,
) -> DataBundle:
    """Read `root/<class>/<image>` (split by seed) or `root/{train,val,test}/<class>/<image>`.

    Args:
        root: folder of class folders, or of `train`, `val`, `test` folders of class folders.
        num_classes: expected number of class folders (checked).
        input_shape: (channels, height, width) images are converted and resized to.
        mean, std: per-channel normalisation (both or neither).
        Others: as for `build_digits`.

    Returns:
        The train/val/test bundle.
    """
    from torchvision.datasets import ImageFolder

    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data.root: image folder '{base}' does not exist")
    transform = _image_transform(input_shape, mean, std)
    presplit = [base / name for name in ("train", "val", "test")]
    try:
        if all(path.is_dir() for path in presplit):
            train, val, test = (ImageFolder(str(path), transform=transform) for path in presplit)
            if not train.classes == val.classes == test.classes:
                raise DataError(f"data.root: train/val/test under '{base}' have different class folders")
        else:
            full = ImageFolder(str(base), transform=transform)
            train, val, test = subsets(full, split_indices(full.targets, val_fraction, test_fraction, split_seed))
            train.classes = full.classes  # type: ignore[attr-defined]
    except (FileNotFoundError, RuntimeError) as error:  # torchvision's "no valid image" / "no class folder"
        raise DataError(f"data.root: cannot read images under '{base}' ({error})") from None
    _check_classes(len(train.classes), num_classes, f"'{base}'")  # type: ignore[attr-defined]
    return make_bundle(
        train, val, test, num_classes=num_classes, input_shape=input_shape, batch_size=batch_size,
        eval_batch_size=eval_batch_size, num_workers=num_workers, shuffle_seed=shuffle_seed, augment=augment,
    )


def build_torchvision_dataset(
    name: str,
    root: str,
    num_classes: int,
    input_shape: Sequence[int],
    download: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 64,
    eval_batch_size: int = 256,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    shuffle_seed: int = 0,
    num_workers: int = 0,
    augment: Sequence[Any] | None = None,
) -> DataBundle:
    """Load a torchvision dataset from `root`: its test split is ours; val is carved from train.

    Args:
        name: one of MNIST, FashionMNIST, CIFAR10, CIFAR100.
        root: local folder holding the dataset as torchvision stores it.
        download: fetch the files if missing (needs a network).
        Others: as for `build_image_folder`.

    Returns:
        The train/val/test bundle.
    """
    import torchvision.datasets as datasets

    require_choice("data.name", name, TORCHVISION_DATASETS)
    base = Path(root).expanduser()
    transform = _image_transform(input_shape, mean, std)
    dataset_class = getattr(datasets, name)
    try:
        full_train: Dataset = dataset_class(str(base), train=True, download=download, transform=transform)
        test: Dataset = dataset_class(str(base), train=False, download=download, transform=transform)
    except RuntimeError as error:  # torchvision: "Dataset not found. You can use download=True ..."
        hint = "place the files there or set data.download=true (needs a network)"
        raise DataError(f"data.root: {name} not found under '{base}' ({hint}; torchvision said: {error})") from None
    except OSError as error:  # a download attempt without a network
        raise DataError(f"data.download: could not fetch {name} into '{base}' ({error})") from None
    _check_classes(len(full_train.classes), num_classes, name)  # type: ignore[attr-defined]
    targets = [int(label) for label in full_train.targets]  # type: ignore[attr-defined]
    train_index, val_index = split_two(targets, val_fraction, split_seed)
    train, val = subsets(full_train, (train_index, val_index))
    return make_bundle(
        train, val, test, num_classes=num_classes, input_shape=input_shape, batch_size=batch_size,
        eval_batch_size=eval_batch_size, num_workers=num_workers, shuffle_seed=shuffle_seed, augment=augment,
    )
