"""Run-folder files that need no torch: atomic JSON writes, and reading a run's ledger.

Every write goes to a temporary file in the same folder and is renamed into place, so a run
killed mid-write leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from effitrain.errors import ConfigError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)` and rename the result to `path` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~umask())  # mkstemp makes it private; the file gets the user's usual mode
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def umask() -> int:
    """The process umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, payload: Any) -> None:
    """Write `payload` as indented JSON, atomically."""
    atomic_write(path, lambda temporary: temporary.write_text(json.dumps(payload, indent=2) + "\n"))


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A run folder's summary.json, checked to be a ledger.

    Raises:
        ConfigError: not a run folder, or a summary.json that is not a readable ledger (named).
    """
    path, config = run_dir / "summary.json", run_dir / ".hydra" / "config.yaml"
    if not path.is_file() or not config.is_file():
        raise ConfigError(f"{run_dir}: not an effitrain run folder (no summary.json or .hydra/config.yaml)")
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not a readable ledger ({type(error).__name__}: {str(error).splitlines()[0][:120]}); the folder is left as it is") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("stages"), list) or not all(
        isinstance(row, dict) and isinstance(row.get("name"), str) for row in summary["stages"]
    ):
        raise ConfigError(f"{path}: not a readable ledger (no list of stage rows); the folder is left as it is")
    return summary


