"""Config composition, validation and stage building, without running anything."""

import pytest
from omegaconf import OmegaConf

from effitrain.config import recipe_description, recipe_files
from effitrain.config.compose import compose, expand_sweeps, unique_dir
from effitrain.config.schema import validate
from effitrain.errors import ConfigError
from effitrain.pipeline import build_stages
from effitrain.stages.train import Train


def test_every_recipe_composes_validates_and_says_what_it_shows() -> None:
    for name, path in recipe_files().items():
        cfg = compose([f"recipe={name}"])
        validate(cfg)
        assert build_stages(cfg), name
        assert recipe_description(path), f"{name} has no description comment"


def test_recipe_overrides_root_and_cli_overrides_recipe() -> None:
    cfg = compose(["recipe=baseline", "stage.train.trainer.max_epochs=3"])
    assert cfg.trainer.max_epochs == 15  # the recipe's value beats conf/trainer/default.yaml
    assert list(cfg.stage) == ["train", "evaluate"]
    stage = build_stages(cfg)["train"]
    assert isinstance(stage, Train) and stage.trainer["max_epochs"] == 3


def test_stage_fields_are_typed() -> None:
    cfg = compose(["recipe=baseline", "+stage.train.model=3"])
    with pytest.raises(ConfigError, match=r"^stage.train.model"):
        build_stages(cfg)


def test_user_recipe_folder_via_searchpath(tmp_path) -> None:
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text(
        "# @package _global_\n# Mine.\ndefaults:\n  - /stage@stage.fit: train\n  - override /model: mlp\nseed: 7\n"
    )
    cfg = compose(["recipe=mine", f"hydra.searchpath=[file://{tmp_path}]"])
    assert cfg.seed == 7 and list(cfg.stage) == ["fit"] and "MLP" in cfg.model._target_


def test_missing_required_value_is_named() -> None:
    with pytest.raises(ConfigError, match="data.root: no value set"):
        validate(compose(["data=image_folder", "data.num_classes=3"]))


def test_sweep_expansion() -> None:
    combos = list(expand_sweeps(["a=1,2", "b=x,y", "c=3"]))
    assert len(combos) == 4 and ["a=2", "b=y", "c=3"] in combos


def test_unique_dir_never_reuses_a_folder(tmp_path) -> None:
    first = unique_dir(str(tmp_path / "run"))
    assert unique_dir(str(tmp_path / "run")) == first  # memoised within a process
    (tmp_path / "other").mkdir()
    assert unique_dir(str(tmp_path / "other")).endswith("other_2")


def test_empty_stage_list_is_refused() -> None:
    cfg = compose(["recipe=baseline"])
    cfg = OmegaConf.merge(cfg, {})
    OmegaConf.set_struct(cfg, False)
    cfg.stage = {}
    with pytest.raises(ConfigError, match="no stages"):
        validate(cfg)
