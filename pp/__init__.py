"""pp: pipeline-parallel training for PyTorch.

The names mirror torch.distributed.pipelining, so code written for it moves here by changing one import.
"""
from __future__ import annotations

import atexit
import importlib
import sys

from .stage.marker import SplitPoint, pipe_split
from .stage.pipe import Pipe, PipeInfo
from .stage.policies import Segment, split_by_cost, split_into_equal_size
from .stage.split import PipelineTraceError, pipeline

_LAZY = {
    "PipelineStage": "pp.stage.runtime",
    "build_stage": "pp.stage.runtime",
    "ScheduleGPipe": "pp.schedules.classes",
    "Schedule1F1B": "pp.schedules.classes",
    "ScheduleInterleaved1F1B": "pp.schedules.classes",
    "ScheduleLoopedBFS": "pp.schedules.classes",
    "ScheduleInterleavedZeroBubble": "pp.schedules.classes",
    "ScheduleZBVZeroBubble": "pp.schedules.classes",
    "ScheduleDualPipeV": "pp.schedules.classes",
    "ScheduleZBVHalf": "pp.schedules.classes",
    "ScheduleZBVMin": "pp.schedules.classes",
    "PipelineScheduleSingle": "pp.schedules.classes",
    "PipelineScheduleMulti": "pp.schedules.classes",
    "_ScheduleForwardOnly": "pp.schedules.classes",
    "schedule_from_actions": "pp.schedules.classes",
    "load_unsplit": "pp.checkpoint_api",
    "parallelize": "pp.parallel.api",
    "ParallelModel": "pp.parallel.model",
}

__all__ = [
    "Pipe", "PipeInfo", "PipelineTraceError", "Segment", "SplitPoint", "pipe_split", "pipeline",
    "split_by_cost", "split_into_equal_size", *(n for n in _LAZY if not n.startswith("_")),
]


_SUBMODULES = ("schedules", "microbatch", "stage", "comms", "parallel", "data", "losses", "testing", "tune",
               "launcher", "weights")


def __getattr__(name: str):
    # Runtime, schedules and checkpoint code load on first use: `import pp` stays light.
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:   # `import pp; pp.schedules.get_schedule_class(...)`, as torch's subpackages
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'pp' has no attribute {name!r}")


def __dir__() -> list[str]:
    """Every public name, those loaded on first use included (tab completion, help(pp))."""
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


def _at_exit() -> None:
    # Registered at import so that it runs after the handlers registered since (atexit runs them last
    # first): the process-group teardown a pipeline needs (pp.comms.backend.at_interpreter_exit).
    backend = sys.modules.get("pp.comms.backend")
    if backend is not None:
        backend.at_interpreter_exit()


atexit.register(_at_exit)
