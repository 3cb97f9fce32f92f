"""Schedule classes with torch.distributed.pipelining's constructors: each names a generator; one
executor runs them all (`pp.schedules.base`). `schedule_from_actions` runs a schedule the user wrote
(CSV or action strings).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

from ..stage.runtime import PipelineStage
from .base import _PipelineSchedule
from .registry import get_spec


class PipelineScheduleSingle(_PipelineSchedule):
    """A schedule with one stage per rank."""

    def __init__(self, stage: PipelineStage, n_microbatches: int, loss_fn: Callable | None = None,
                 args_chunk_spec: Any = None, kwargs_chunk_spec: Any = None, output_merge_spec: Any = None,
                 scale_grads: bool = True):
        if not isinstance(stage, PipelineStage):
            raise TypeError(f"{type(self).__name__} takes one PipelineStage (use a multi-stage schedule "
                            f"for several), got {type(stage).__name__}")
        super().__init__(stage, n_microbatches, loss_fn, args_chunk_spec, kwargs_chunk_spec,
                         output_merge_spec, scale_grads)


class PipelineScheduleMulti(_PipelineSchedule):
    """A schedule with several stages per rank (a list of this rank's stages). The base class takes its
    action lists from `_load_csv` or from assigning `pipeline_order` (a subclass's constructor, as in
    torch's test zoo); its parameters are torch's, `use_full_backward` included (ignored with a warning,
    as there), and `stage_index_to_group_rank` of earlier torch releases: {stage: rank}, checked against
    the placement the action lists give (ValueError where they differ)."""

    def __init__(self, stages: Sequence[PipelineStage], n_microbatches: int, loss_fn: Callable | None = None,
                 args_chunk_spec: Any = None, kwargs_chunk_spec: Any = None, output_merge_spec: Any = None,
                 use_full_backward: bool | None = None, scale_grads: bool = True,
                 backward_requires_autograd: bool = True, defer_pp_recv: bool = False, *,
                 stage_index_to_group_rank: dict[int, int] | None = None):
        if use_full_backward is not None:
            warnings.warn("use_full_backward is no longer supported (nor in torch.distributed.pipelining): "
                          "stop passing it", FutureWarning, stacklevel=2)
        if stage_index_to_group_rank is not None:
            if not isinstance(stage_index_to_group_rank, dict) or not all(
                    isinstance(k, int) and isinstance(v, int) for k, v in stage_index_to_group_rank.items()):
                raise TypeError(f"stage_index_to_group_rank must be a dict of stage index -> rank (ints), got "
                                f"{stage_index_to_group_rank!r}")
            self._given_placement = dict(stage_index_to_group_rank)
        self._multi_init(stages, n_microbatches, loss_fn, args_chunk_spec, kwargs_chunk_spec, output_merge_spec,
                         scale_grads, backward_requires_autograd, defer_pp_recv)

    def _multi_init(self, stages, n_microbatches, loss_fn, args_chunk_spec, kwargs_chunk_spec, output_merge_spec,
                    scale_grads, backward_requires_autograd, defer_pp_recv) -> None:
        if isinstance(stages, PipelineStage):
            stages = [stages]
        _PipelineSchedule.__init__(self, list(stages), n_microbatches, loss_fn, args_chunk_spec,
                                   kwargs_chunk_spec, output_merge_spec, scale_grads,
                                   backward_requires_autograd=backward_requires_autograd,
                                   defer_pp_recv=defer_pp_recv)


class _PipelineScheduleRuntime(PipelineScheduleMulti):
    """torch's runtime for action lists loaded with `_load_csv` (private there too): the same as
    `PipelineScheduleMulti` followed by `_load_csv`."""


class _ScheduleForwardOnly(PipelineScheduleSingle):
    """torch's forward-only schedule (private there too; its tests import it): every `step` runs the
    forwards of all microbatches, GPipe's order, without a backward; the last stage's rank gets the
    merged output, detached (torch's keeps the last stage's graph), and the losses given a `loss_fn` and
    `target` (torch raises)."""
    _name = "GPipe"

    def step(self, *args, target=None, losses: list | None = None, return_outputs: bool = True,
             loss_kwargs: dict | None = None, **kwargs) -> Any:
        return self._run(args, kwargs, target, losses, False, return_outputs, loss_kwargs)


class _NamedMulti(PipelineScheduleMulti):
    """A multi-stage schedule that generates its own action lists; torch's parameters, in its order."""

    def __init__(self, stages: Sequence[PipelineStage], n_microbatches: int, loss_fn: Callable | None = None,
                 args_chunk_spec: Any = None, kwargs_chunk_spec: Any = None, output_merge_spec: Any = None,
                 scale_grads: bool = True, backward_requires_autograd: bool = True, defer_pp_recv: bool = False):
        self._multi_init(stages, n_microbatches, loss_fn, args_chunk_spec, kwargs_chunk_spec, output_merge_spec,
                         scale_grads, backward_requires_autograd, defer_pp_recv)


class ScheduleGPipe(PipelineScheduleSingle):
    _name = "GPipe"


class Schedule1F1B(PipelineScheduleSingle):
    _name = "1F1B"


class ScheduleInterleaved1F1B(_NamedMulti):
    _name = "Interleaved1F1B"


class ScheduleLoopedBFS(PipelineScheduleMulti):
    """torch's positional order: its fourth parameter is `output_merge_spec` (chunk specs by keyword)."""
    _name = "LoopedBFS"

    def __init__(self, stages: Sequence[PipelineStage], n_microbatches: int, loss_fn: Callable | None = None,
                 output_merge_spec: Any = None, scale_grads: bool = True, backward_requires_autograd: bool = True,
                 defer_pp_recv: bool = False, *, args_chunk_spec: Any = None, kwargs_chunk_spec: Any = None):
        self._multi_init(stages, n_microbatches, loss_fn, args_chunk_spec, kwargs_chunk_spec, output_merge_spec,
                         scale_grads, backward_requires_autograd, defer_pp_recv)


class ScheduleInterleavedZeroBubble(_NamedMulti):
    _name = "InterleavedZeroBubble"


class ScheduleZBVZeroBubble(_NamedMulti):
    _name = "ZBVZeroBubble"


class ScheduleDualPipeV(_NamedMulti):
    _name = "DualPipeV"


class ScheduleZBVHalf(_NamedMulti):
    _name = "ZBVHalf"


class ScheduleZBVMin(_NamedMulti):
    _name = "ZBVMin"


SCHEDULE_CLASSES = {cls._name: cls for cls in (
    ScheduleGPipe, Schedule1F1B, ScheduleInterleaved1F1B, ScheduleLoopedBFS, ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble, ScheduleDualPipeV, ScheduleZBVHalf, ScheduleZBVMin)}


def schedule_class(name: str) -> type:
    """The schedule class for a registry name (case-insensitive), e.g. "1F1B" -> Schedule1F1B."""
    return SCHEDULE_CLASSES[get_spec(name).name]


def get_schedule_class(schedule_name: str) -> type:
    """The schedule class for a name, case-insensitive, as torch.distributed.pipelining's function of the
    name: a registry name ("1F1B", "ZBVZeroBubble", pp's "ZBVHalf", ...) or one of the two base classes
    ("PipelineScheduleSingle", "PipelineScheduleMulti"). ValueError naming the valid ones otherwise."""
    bases = {"PipelineScheduleSingle": PipelineScheduleSingle, "PipelineScheduleMulti": PipelineScheduleMulti}
    if isinstance(schedule_name, str):
        for name, cls in bases.items():
            if name.lower() == schedule_name.strip().lower():
                return cls
    try:
        return schedule_class(schedule_name)
    except ValueError:
        raise ValueError(f"unknown schedule name {schedule_name!r}: expected one of "
                         f"{', '.join([*SCHEDULE_CLASSES, *bases])}") from None


def schedule_from_actions(stages: PipelineStage | Sequence[PipelineStage], n_microbatches: int,
                          actions: Any, loss_fn: Callable | None = None, **kwargs) -> _PipelineSchedule:
    """A schedule from lists the user wrote: a CSV path, `{rank: ["0F0", "0B0", ...]}` or a list of rows.

    torch.distributed.pipelining's CSV files read as they are (see pp.schedules.csvio): blank cells are
    bubbles, compound cells such as ``(0F7;7B3)OVERLAP_F_B`` run their actions in the order written.
    Compute-only lists get their sends and receives added; lists that already have them are validated
    and run as written. `pipeline_order` then gives the compute cells as written (None for a blank),
    `pipeline_order_with_comms` every rank's list as run. Errors name the rank, row, column and cell.
    """
    from .csvio import flatten, read_rows

    rows = read_rows(actions)
    return _PipelineSchedule(stages, n_microbatches, loss_fn, actions=flatten(rows), rows=rows, **kwargs)
