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
