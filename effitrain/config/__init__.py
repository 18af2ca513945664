"""Where effitrain's configs and recipes live, and how recipes join Hydra's `recipe` group.

Recipes are whole experiments kept in the top-level `recipes/` folder (shipped inside the
wheel as `effitrain/recipes`). Hydra looks up config groups as sub-folders of its search
path, so the built-in recipes are registered in Hydra's ConfigStore under the group
`recipe`; user recipes in `<dir>/recipe/NAME.yaml` join through `hydra.searchpath`.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _data_dir(name: str) -> Path:
    """Return the folder `name`: inside the installed package (wheel) or beside it (source tree)."""
    for candidate in (_PACKAGE_DIR / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"effitrain's '{name}' folder is missing from {_PACKAGE_DIR}")


CONF_DIR = _data_dir("conf")
RECIPES_DIR = _data_dir("recipes")
DEFAULT_RECIPE = "quickstart"


def recipe_files() -> dict[str, Path]:
    """Map each built-in recipe's name to its YAML file, sorted by name."""
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_description(path: Path) -> str:
    """Return a recipe's first comment line (its one-line description), or '' if it has none."""
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") and not text.startswith("# @package"):
            return text.lstrip("#").strip()
        if text and not text.startswith("#"):
            break
    return ""


def register_recipes() -> None:
    """Store every built-in recipe in Hydra's ConfigStore as `recipe/<name>`, and the per-stage
    training override block as `stage/_training` (generated from the trainer's schema). Idempotent."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from effitrain.config.schema import stage_training_block

    store = ConfigStore.instance()
    for name, path in recipe_files().items():
        store.store(group="recipe", name=name, node=OmegaConf.load(path), package="_global_")
    store.store(group="stage", name="_training", node=OmegaConf.create(stage_training_block()))


def group_defaults(group: str, option: str) -> dict:
    """The defaults of one config group option (`conf/<group>/<option>.yaml`) as a plain dict,
    for Python callers (tests, benchmarks) that build components without composing a recipe."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    return {key: value for key, value in OmegaConf.to_container(node).items() if key != "defaults"}  # type: ignore[union-attr]


def locate(path: str) -> object:
    """Import the object at dotted `path` (`package.module.Name`) quietly.

    Hydra's own `get_class`/`get_method` log an error before raising; the CLI wants one line.

    Raises:
        ImportError: nothing importable at `path`.
    """
    import importlib

    if not isinstance(path, str) or "." not in path:
        raise ImportError(f"{path!r} is not a dotted path")
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for attribute in parts[split:]:
                found = getattr(found, attribute)
        except AttributeError:
            break
        return found
    raise ImportError(f"cannot import {path!r}")
