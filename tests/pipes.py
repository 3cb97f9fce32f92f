"""Cut a test model once per process and hand out deep copies: tests that run the same model under many
schedules or settings trace it once per stage count instead of once per run (tracing dominates them)."""
from __future__ import annotations

import copy
from typing import Callable

import torch.nn as nn

import pp

_CUT: dict = {}


def fresh_pipe(key: object, make_model: Callable[[], nn.Module], mb_args: tuple, n_stages: int) -> "pp.Pipe":
    """A deep copy of `make_model()` cut by cost into `n_stages` stages; the cut is made once per
    (`key`, `n_stages`) in this process, so `make_model` must build the same weights every time."""
    if (key, n_stages) not in _CUT:
        _CUT[key, n_stages] = pp.pipeline(make_model(), mb_args, split_policy=pp.split_by_cost(n_stages))
    return copy.deepcopy(_CUT[key, n_stages])


def placed(name: str, world: int, rank: int) -> tuple[int, list[int]]:
    """(stage count, the stages `rank` holds) for schedule `name` at `world` ranks: one stage per rank,
    or two for schedules that take several."""
    from pp.schedules.registry import get_spec

    spec = get_spec(name)
    n_stages = world * (spec.stages_per_rank or 2)
    return n_stages, [s for s in range(n_stages) if spec.placement(n_stages, world)[s] == rank]


def schedule_for(name: str, stages: list, n_microbatches: int, loss_fn: Callable):
    """Schedule `name` over this rank's `stages` (the one stage itself where it takes one)."""
    from pp.schedules.classes import schedule_class
    from pp.schedules.registry import get_spec

    one = get_spec(name).stages_per_rank == 1
    return schedule_class(name)(stages[0] if one else stages, n_microbatches, loss_fn=loss_fn)
