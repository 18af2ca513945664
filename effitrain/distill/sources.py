"""Where teachers come from, how students are derived from them, and cached teacher outputs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from effitrain.batch import move
from effitrain.checkpoint import load_weights, unreadable
from effitrain.data.bundle import SeededShuffle, _Transformed
from effitrain.errors import ConfigError, not_allowed

PRETRAINED = "pretrained"


def teacher_source(
    source: str, earlier: list[str], where: str, check_run: Callable[[Path, str | None], str] | None = None
) -> tuple[str, Path | None, str | None]:
    """What kind of teacher `source` names: ('stage'|'pretrained'|'file'|'run', path, run stage).

    Files are read as far as needed to know they will load (a safetensors header; a run
    folder's summary through `check_run`), so a bad teacher stops the run before any training.

    Args:
        check_run: checks a run folder has that completed stage; returns the stage's name.

    Raises:
        ConfigError: none of them (listing what is allowed), or a file that cannot be read.
    """
    if source in earlier:
        return "stage", None, None
    if source == PRETRAINED:
        return "pretrained", None, None
    path_text, _, stage = source.partition(":") if not Path(source).exists() else (source, "", "")
    path = Path(path_text).expanduser()
    if path.is_file() and path.suffix == ".safetensors":
        reason = unreadable(path)
        if reason is not None:
            raise ConfigError(f"{where} = {source!r}: not a readable safetensors file ({reason})")
        return "file", path, None
    if path.is_dir():
        if check_run is not None:
            try:
                stage = check_run(path, stage or None)
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
        return "run", path, stage or None
    allowed = [*earlier, PRETRAINED, "a .safetensors file", "a run folder[:STAGE]"]
    raise ConfigError(f"{where} = {source!r}: no such teacher (allowed: {', '.join(allowed)})")


def resolve_teacher(
    source: str,
    earlier: dict[str, nn.Module],
    teacher_model: Any,
    build: Callable[[Any], nn.Module],
    load_run: Callable[[Path, str | None], nn.Module] | None,
    where: str,
) -> nn.Module:
    """Return the teacher named by `source`.

    Args:
        source: the name of an earlier stage of this recipe; 'pretrained' (build `teacher_model`
            as configured, e.g. a pretrained transformer); a .safetensors file (weights for
            `teacher_model`); or a run folder, optionally with ':STAGE' (that stage's model as
            the run saved it; default its last completed stage).
        earlier: models of the stages already run, by name.
        teacher_model: the teacher's model config (for 'pretrained' and .safetensors files).
        build: builds a model from a config (on the run device).
        load_run: rebuilds a run folder's stage model (for run-folder teachers).
        where: config path for errors.
    """
    kind, path, stage = teacher_source(source, list(earlier), where)
    if kind == "stage":
        return earlier[source]
    if kind == "pretrained":
        return build(teacher_model)
    if kind == "file":
        teacher = build(teacher_model)
        try:
            return load_weights(teacher, path)
        except RuntimeError as error:
            raise ConfigError(f"{where}: {path} does not fit the teacher model ({str(error).splitlines()[0][:300]})") from None
    assert load_run is not None and path is not None, "run-folder teachers need a run loader"
    try:
        return load_run(path, stage)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The longest ModuleList of same-class blocks (a transformer's layers), with its name."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(block) for block in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def derive_student(teacher: nn.Module, keep_every: int, where: str) -> nn.Module:
    """DistilBERT-style student: a copy of `teacher` keeping layers 0, k, 2k, … with their weights.

    Raises:
        ConfigError: the teacher has no list of repeated layers, or keeps all of them.
    """
    found = layer_list(teacher)
    if found is None:
        raise ConfigError(
            f"{where}: keep_every needs a teacher with a list of repeated layers (e.g. a BERT encoder); "
            f"{type(teacher).__name__} has none (give a student model config instead)"
        )
    name, layers = found
    if keep_every < 2 or keep_every > len(layers):
        raise not_allowed(where, keep_every, f"an integer in [2, {len(layers)}], the teacher's {name} has {len(layers)} layers")
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    kept = nn.ModuleList(list(student.get_submodule(name))[::keep_every])
    parent_name, _, attribute = name.rpartition(".")
    setattr(student.get_submodule(parent_name) if parent_name else student, attribute, kept)
    config = getattr(student, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(kept)
    for index, block in enumerate(kept):  # HF attention layers carry their index (KV caches)
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    return student


class _WithTeacher(Dataset):
    """(inputs, label) → (inputs, (label, teacher logits)) by example index."""

    def __init__(self, dataset: Dataset, logits: Tensor) -> None:
        self.dataset = dataset
        self.logits = logits

    def __len__(self) -> int:
        return len(self.logits)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        inputs, label = self.dataset[index]
        return inputs, (label, self.logits[index])


def cache_teacher_outputs(
    loader: DataLoader, teacher_logits: Callable[[Any], Tensor], device: torch.device, where: str,
    split: Callable[[Any], tuple[Any, Any]] = lambda batch: batch,
) -> DataLoader:
    """A training loader whose labels carry the teachers' logits, computed once.

    Only sound when an example's inputs are the same every epoch, so augmentation is refused.
    """
    dataset = loader.dataset
    if isinstance(dataset, _Transformed):
        raise ConfigError(f"{where}: cannot cache teacher outputs with data.augment set (inputs change every epoch); set it false or drop the augmentation")
    ordered = DataLoader(dataset, batch_size=loader.batch_size or 64, shuffle=False, collate_fn=loader.collate_fn)
    outputs = [teacher_logits(move(split(batch)[0], device)).cpu() for batch in ordered]
    sampler = loader.sampler
    seed = sampler.seed if isinstance(sampler, SeededShuffle) else 0
    return DataLoader(
        _WithTeacher(dataset, torch.cat(outputs)),
        batch_size=loader.batch_size,
        sampler=SeededShuffle(len(dataset), seed),  # type: ignore[arg-type]
        collate_fn=loader.collate_fn,
    )
