"""Building a recipe's data: the `data` config's builder (`_target_`), then the data options
effitrain applies to whatever DataBundle it returns, `label_fraction` and `mix`."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from effitrain.config.schema import DATA_OPTIONS
from effitrain.errors import ConfigError, instantiate_or_explain
from effitrain.tasks import Task


def build_data(cfg: DictConfig) -> Any:
    """Instantiate the `data` config into a DataBundle, with one-line errors; then apply the data
    options effitrain owns for every builder: `label_fraction` (a stratified, seeded subset of
    the training labels) and `mix` (Mixup/CutMix on training batches)."""
    from effitrain.data.labels import keep_labels
    from effitrain.data.mixing import check_mix, mix_loader

    node = OmegaConf.masked_copy(cfg.data, [key for key in cfg.data if key not in DATA_OPTIONS])
    bundle = instantiate_or_explain(node, "data", _convert_="all")
    fraction = cfg.data.get("label_fraction")
    if fraction is not None and fraction != 1:
        bundle = keep_labels(bundle, float(fraction), int(cfg.data.get("split_seed", 0)))
    mix = check_mix(OmegaConf.to_container(cfg.data.mix) if cfg.data.get("mix") else None)
    if mix is not None:
        bundle.train = mix_loader(bundle.train, mix, bundle.num_classes)
    return bundle


def check_data_options(cfg: DictConfig, task: Task) -> None:
    """`data.mix` and `data.label_fraction` fit the data and the task (before any work).

    Raises:
        ConfigError: the first problem found.
    """
    from effitrain.data.mixing import check_mix
    from effitrain.tasks import Classification

    fraction = cfg.data.get("label_fraction")
    if fraction is not None and not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1):
        raise ConfigError(f"data.label_fraction = {fraction!r} is not allowed (allowed: a fraction in (0, 1])")
    mix = check_mix(OmegaConf.to_container(cfg.data.mix) if cfg.data.get("mix") else None)
    if mix is None:
        return
    if cfg.data.get("tokenizer"):
        raise ConfigError(f"data.mix = {mix['kind']!r}: Mixup and CutMix mix images; data {cfg.data.get('_target_')!r} is text "
                          "(allowed: data.mix=null)")
    if not isinstance(task, Classification):
        raise ConfigError(f"data.mix = {mix['kind']!r}: mixing makes soft class targets, and the task {task.name} is not a "
                          "classification (allowed: data.mix=null)")
