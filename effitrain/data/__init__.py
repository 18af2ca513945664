"""Datasets and loaders. Each `build_*` function returns a `DataBundle` with seeded splits.

The `data` config group names one of these builders with `_target_`; any user function that
returns a `DataBundle` works the same way.
"""

from effitrain.data.bundle import DataBundle, SeededShuffle, build_augment, make_bundle, split_indices

__all__ = ["DataBundle", "SeededShuffle", "build_augment", "make_bundle", "split_indices"]
