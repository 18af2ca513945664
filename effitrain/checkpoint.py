"""Atomic, safe checkpoint files: safetensors for weights, torch.save for training state.

Every write goes to a temporary file in the same folder and is renamed into place, so a run
killed mid-write leaves the previous checkpoint intact. Training state is loaded with
`weights_only=True`: no pickled code runs on load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from effitrain.runfiles import atomic_write, write_json  # noqa: F401  (write_json: re-exported for callers)


def save_weights(model: nn.Module, path: Path) -> None:
    """Save `model`'s state dict as safetensors (shared tensors are stored once)."""
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in _unshare(model.state_dict()).items()}
    atomic_write(path, lambda temporary: save_file(state, str(temporary)))


def save_compressed(model: nn.Module, path: Path, only_if_smaller: bool = False) -> Path | None:
    """Save `model`'s state dict in the Deep-Compression format (`effitrain.compress.storage`)
    next to `path`, with its suffix; return the file written.

    Args:
        only_if_smaller: write nothing and return None unless the encodings shrink the weights
            to under 90% of their raw bytes (the model has sparse or shared weights) and every
            tensor is one the format holds.
    """
    from effitrain.compress import storage

    try:
        packed = storage.pack(_unshare(model.state_dict()))
    except storage.StorageError:  # e.g. torch quantized tensors: they stay in the stage's own format
        if only_if_smaller:
            return None
        raise
    if only_if_smaller and not packed.worth_it:
        return None
    target = Path(path).with_suffix(storage.SUFFIX)
    storage.write(packed, target)
    return target


def compresses(model: nn.Module) -> bool:
    """Whether `save_compressed(model, ..., only_if_smaller=True)` would write a file: the model
    has sparse or shared weights the format holds (nothing is written)."""
    from effitrain.compress import storage

    try:
        return storage.pack(_unshare(model.state_dict())).worth_it
    except storage.StorageError:
        return False


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load weights saved by `save_weights` (safetensors) or `save_compressed` into `model` (strict)."""
    state = _read_weights(Path(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if _is_tied(model, name)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"weights in {path} do not fit the model: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
    return model


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from effitrain.compress import storage

    if path.suffix == storage.SUFFIX:
        return storage.read(path)
    return load_file(str(path))


def unreadable(path: Path) -> str | None:
    """Why a checkpoint file cannot be read, in one line ('Type: first sentence'), or None when it
    can: a safetensors header, a whole compressed model file (its checksum), or a whole torch
    state file. Nothing is kept."""
    from effitrain.compress import storage

    try:
        if path.suffix == storage.SUFFIX:
            storage.read(path)
        elif path.suffix == ".safetensors":
            saved_shapes(path)
        else:
            load_state(path)
    except Exception as error:  # safetensors and torch raise many types for a damaged file
        return f"{type(error).__name__}: {str(error).splitlines()[0].split('. ')[0][:160]}"
    return None


def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of a safetensors or compressed model file, read from its header (no
    tensor is loaded)."""
    from safetensors import safe_open

    from effitrain.compress import storage

    if Path(path).suffix == storage.SUFFIX:
        return storage.shapes(path)

    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def save_state(state: dict[str, Any], path: Path) -> None:
    """Save training state (optimizer, scheduler, RNG, counters) atomically with torch.save."""
    atomic_write(path, lambda temporary: torch.save(state, temporary))


def load_state(path: Path) -> dict[str, Any]:
    """Load training state saved by `save_state`; only tensors and plain containers are allowed."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied weights); safetensors refuses them."""
    seen: set[tuple[str, int]] = set()
    kept = {}
    for name, tensor in state.items():
        key = (tensor.device.type, tensor.data_ptr()) if tensor.numel() else ("empty", id(tensor))
        if key in seen:
            continue
        seen.add(key)
        kept[name] = tensor
    return kept


def _is_tied(model: nn.Module, name: str) -> bool:
    """True when parameter `name` shares storage with another parameter of `model`."""
    tensors = model.state_dict(keep_vars=True)
    target = tensors.get(name)
    return target is not None and any(
        other.data_ptr() == target.data_ptr() for other_name, other in tensors.items() if other_name != name
    )
