"""Config composition, validation and stage building, without running anything."""

import pytest
from omegaconf import OmegaConf

from effitrain.config import CONF_DIR, recipe_description, recipe_files
from effitrain.config.compose import compose, expand_sweeps, unique_dir
from effitrain.config.schema import validate
from effitrain.errors import ConfigError
from effitrain.pipeline import make_plan
from effitrain.stages.train import Train


def test_every_recipe_composes_validates_and_says_what_it_shows() -> None:
    for name, path in recipe_files().items():
        cfg = compose([f"recipe={name}"])
        validate(cfg)
        assert make_plan(cfg).stages, name
        assert recipe_description(path), f"{name} has no description comment"


def test_recipe_overrides_root_and_cli_overrides_recipe() -> None:
    cfg = compose(["recipe=baseline", "stage.train.trainer.max_epochs=3"])
    assert cfg.trainer.max_epochs == 15  # the recipe's value beats conf/trainer/default.yaml
    assert list(cfg.stage) == ["train", "evaluate"]
    stage = make_plan(cfg).stages["train"]
    assert isinstance(stage, Train) and stage.trainer["max_epochs"] == 3


def test_stage_fields_are_typed() -> None:
    cfg = compose(["recipe=baseline", "+stage.train.model=3"])
    with pytest.raises(ConfigError, match=r"^stage.train.model"):
        make_plan(cfg)


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


def _yaml_keys(path) -> list[str]:
    """Top-level keys written in a config file (not the defaults list)."""
    return [line.split(":")[0] for line in path.read_text().splitlines()
            if line and not line.startswith((" ", "#", "-")) and ":" in line and not line.startswith("defaults")]


@pytest.mark.parametrize("stage_file", sorted((CONF_DIR / "stage").glob("*.yaml")), ids=lambda path: path.stem)
def test_stage_yaml_is_the_one_source_of_its_class_defaults(stage_file) -> None:
    """Every field of a stage kind is in its YAML (with a comment) and the class holds no other default."""
    import dataclasses

    from omegaconf import MISSING

    from effitrain.config import locate

    cfg = compose(["recipe=baseline", f"+stage@stage.probe={stage_file.stem}"])
    node = OmegaConf.to_container(cfg.stage.probe)
    stage_class = locate(node.pop("_target_"))
    fields = {field.name: field for field in dataclasses.fields(stage_class)}
    assert set(node) == set(fields), f"{stage_file.name}: YAML keys and {stage_class.__name__} fields differ"
    for name, field in fields.items():
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if default in (MISSING, dataclasses.MISSING):
            continue
        written = {key: value for key, value in node[name].items() if value is not None} if isinstance(node[name], dict) else node[name]
        assert written == default, f"{stage_file.name}: {name} is {node[name]!r} in YAML but {default!r} in {stage_class.__name__}"
    for key in _yaml_keys(stage_file):
        line = next(line for line in stage_file.read_text().splitlines() if line.startswith(f"{key}:"))
        assert key == "_target_" or "#" in line, f"{stage_file.name}: {key} has no comment"


def test_trainer_schema_and_yaml_list_the_same_keys() -> None:
    import dataclasses

    from effitrain.config import group_defaults
    from effitrain.config.schema import TrainerConfig

    assert set(group_defaults("trainer", "default")) == {field.name for field in dataclasses.fields(TrainerConfig)}
    # defaults live in the YAML only; a key added later also carries the YAML's value, so older run folders still load
    yaml = group_defaults("trainer", "default")
    assert all(field.default in ("???", yaml[field.name]) for field in dataclasses.fields(TrainerConfig))


def test_a_builder_that_raises_is_one_line_naming_the_target() -> None:
    from effitrain.data.build import build_data
    from effitrain.errors import DataError
    from effitrain.stages.base import build_model

    with pytest.raises(ConfigError, match=r"^model: cannot build 'torch.nn.Linear' \(empty\(\): argument 'size'"):
        build_model(OmegaConf.create({"_target_": "torch.nn.Linear", "in_features": "many", "out_features": 2}))
    with pytest.raises(DataError, match="missing.csv"):  # the builder's own error passes through as it is
        build_data(OmegaConf.create({"data": {"_target_": "effitrain.data.text.read_text_table", "path": "missing.csv"}}))
