"""Pipeline stages. Each is a dataclass whose fields are its config (types in the class,
defaults in conf/stage/*.yaml); `prepare` returns what it starts from, `run` returns a
`StageResult`. A recipe names a stage class with `_target_` (see conf/stage/), so new kinds plug
in without touching the pipeline."""

from effitrain.stages.base import Context, Prepared, Stage, StageResult, build_stage

__all__ = ["Context", "Prepared", "Stage", "StageResult", "build_stage"]
