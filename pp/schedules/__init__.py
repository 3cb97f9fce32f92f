"""Schedules as data (pp.schedules.actions), their generators and validator, and the runtime classes.

`pp.schedules` also answers for the names code written for `torch.distributed.pipelining.schedules`
imports from there (the schedule classes, `_PipelineScheduleRuntime`), loaded on first use."""
from __future__ import annotations

_FROM_CLASSES = ("_PipelineScheduleRuntime", "PipelineScheduleSingle", "PipelineScheduleMulti", "ScheduleGPipe",
                 "Schedule1F1B", "ScheduleInterleaved1F1B", "ScheduleLoopedBFS", "ScheduleInterleavedZeroBubble",
                 "ScheduleZBVZeroBubble", "ScheduleDualPipeV", "ScheduleZBVHalf", "ScheduleZBVMin",
                 "schedule_from_actions", "get_schedule_class", "_ScheduleForwardOnly")


# torch's names for schedule actions, for schedules written as torch's test zoo writes them
_FROM_TORCH_ACTIONS = ("_Action", "_ComputationType", "FORWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT", "UNSHARD",
                       "RESHARD", "SEND_F", "RECV_F", "SEND_B", "RECV_B", "FULL_BACKWARD", "OVERLAP_F_B",
                       "REDUCE_GRAD", "F", "I", "W", "B")


def __getattr__(name: str):
    if name == "_PipelineSchedule":   # the base of every schedule class (torch's tests check issubclass)
        from .base import _PipelineSchedule

        return _PipelineSchedule
    if name == "_PipelineContext":   # what custom functions (register_custom_function) are given
        from .custom_functions import _PipelineContext

        return _PipelineContext
    if name in _FROM_CLASSES:
        from . import classes

        return getattr(classes, name)
    if name in _FROM_TORCH_ACTIONS:
        from . import torch_actions

        return getattr(torch_actions, name)
    raise AttributeError(f"module 'pp.schedules' has no attribute {name!r}")
