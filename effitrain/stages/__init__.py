"""Pipeline stages. Each is a dataclass whose fields are its config (validated by OmegaConf)
and whose `run` takes the model and hands back the (possibly new) one. A recipe names a stage
class with `_target_` (see conf/stage/), so new kinds plug in without touching the pipeline."""

from effitrain.stages.base import Context, Stage, build_stage

__all__ = ["Context", "Stage", "build_stage"]
