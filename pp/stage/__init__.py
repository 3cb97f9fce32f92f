"""Stages: splitting a model (`pp.stage.split`, `pp.stage.pipe`) and running one stage (`pp.stage.runtime`).

`pp.stage` also answers for the names code written for `torch.distributed.pipelining.stage` imports from
there (`PipelineStage`, `build_stage`, and `_PipelineStageBase`, the base class torch's schedules are
typed with), loaded on first use."""
from __future__ import annotations

_FROM_RUNTIME = {"PipelineStage": "PipelineStage", "_PipelineStageBase": "PipelineStage",
                 "build_stage": "build_stage"}


def __getattr__(name: str):
    if name in _FROM_RUNTIME:
        from . import runtime

        return getattr(runtime, _FROM_RUNTIME[name])
    raise AttributeError(f"module 'pp.stage' has no attribute {name!r}")
