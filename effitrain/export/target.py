"""Where an export goes: the artifact path, its record and tokenizer beside it or inside one
folder, checked so that nothing existing is overwritten, staged, and published in one move."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from effitrain.errors import ConfigError


@dataclass
class Target:
    """Where an export goes: the artifact, its record and the tokenizer (text models), either as
    siblings of a file artifact or together inside `folder`."""

    artifact: Path
    record: Path
    tokenizer: Optional[Path]
    folder: Optional[Path] = None

    def paths(self) -> list[Path]:
        return [path for path in (self.artifact, self.record, self.tokenizer) if path is not None]

    def staged(self, staging: Path) -> "Target":
        """The same layout inside `staging` (which becomes `folder`, or holds the siblings)."""
        if self.folder is not None:
            return Target(*(staging / path.relative_to(self.folder) if path is not None else None
                            for path in (self.artifact, self.record, self.tokenizer)), folder=staging)
        return Target(*(staging / path.name if path is not None else None for path in (self.artifact, self.record, self.tokenizer)))

    def publish(self, staged: "Target") -> None:
        """Move a staged export into place (a folder in one rename)."""
        if self.folder is not None:
            if self.folder.is_dir():
                self.folder.rmdir()  # checked empty before
            os.replace(staged.folder, self.folder)  # type: ignore[arg-type]
            return
        for source, final in zip(staged.paths(), self.paths()):
            os.replace(source, final)


def parse_target(text: str) -> tuple[Path, Optional[str]]:
    """RUN_DIR or RUN_DIR:STAGE."""
    if ":" in text and not Path(text).exists():
        folder, _, stage = text.rpartition(":")
        return Path(folder), stage or None
    return Path(text), None


def plan_target(run_dir: Path, stage: str, fmt: str, output: Optional[Path], text: bool, chosen: bool = True) -> Target:
    """The paths an export writes, refused when any exists (effitrain never overwrites).

    A folder format (hf) or an output without a suffix is a folder holding the model file,
    tokenizer/ and export.json; a file output (`int8.onnx`) gets `int8.export.json` and
    `int8.tokenizer/` beside it. The default is RUN_DIR/artifacts/STAGE.SUFFIX (or STAGE_hf/).

    Raises:
        ConfigError: a path that holds files, a suffix the format does not write, or a missing parent folder.
    """
    from effitrain.export.formats import FORMATS

    suffix = FORMATS[fmt].suffix
    default = output is None
    if output is None:  # RUN_DIR/artifacts/ is made when the export is written, after every check
        output = run_dir / "artifacts" / (f"{stage}{suffix}" if suffix else f"{stage}_{fmt}")
    if suffix and output.suffix == suffix:
        stem = output.with_suffix("")
        target = Target(output, stem.with_name(stem.name + ".export.json"), stem.with_name(stem.name + ".tokenizer") if text else None)
        for path in target.paths():
            if path.exists():
                raise ConfigError(f"-o {output}: {path} already exists; effitrain never overwrites (allowed: a new path)")
    elif output.suffix:
        named = f"--format {fmt}" if chosen else f"{fmt} (the default format for this model)"
        raise ConfigError(f"-o {output}: {named} writes {'*' + suffix + ' or a folder' if suffix else 'a folder'} (allowed: "
                          f"{'a path ending in ' + suffix + ', or ' if suffix else ''}a new or empty folder)")
    else:
        if output.exists() and not (output.is_dir() and not any(output.iterdir())):
            raise ConfigError(f"-o {output}: already holds files; effitrain never overwrites (allowed: a new or empty folder)")
        target = Target(output / f"model{suffix}" if suffix else output, output / "export.json",
                        (output / "tokenizer") if text and suffix else None, folder=output)
    if not default and not output.parent.is_dir():
        raise ConfigError(f"-o {output}: folder {output.parent} does not exist")
    return target


def make_readable(folder: Path) -> None:
    """Staged files get the user's usual permissions (mkdtemp makes the folder private)."""
    from effitrain.runfiles import umask

    mask = umask()
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
