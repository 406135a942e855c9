"""The benchmark tasks by name (`TASKS`, `get_task`); see each module for its layout and rules.

mvbench, videomme, longvideobench: scored locally; egoschema: the full set, unlabelled, writes
a submission for the EgoSchema server; egoschema_subset: the 500 labelled questions.
"""

from __future__ import annotations

from earlytom_jax.errors import ConfigError
from earlytom_jax.evals.tasks.base import DataError, Sample, Task
from earlytom_jax.evals.tasks.egoschema import EgoSchema
from earlytom_jax.evals.tasks.longvideobench import LongVideoBench
from earlytom_jax.evals.tasks.mvbench import MVBench
from earlytom_jax.evals.tasks.videomme import VideoMME

TASKS: dict[str, Task] = {
    "mvbench": MVBench(),
    "videomme": VideoMME(),
    "egoschema": EgoSchema(),
    "egoschema_subset": EgoSchema(name="egoschema_subset", subset=True),
    "longvideobench": LongVideoBench(),
}


def get_task(name: str) -> Task:
    """The task called `name`; ConfigError naming the choices otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


__all__ = ["TASKS", "DataError", "Sample", "Task", "get_task"]
