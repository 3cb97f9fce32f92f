"""Data-parallel gradient averaging for pipeline stages, overlapped with the rest of the backward.

A stage's gradients are final once its last backward of the step (B, or W in split-backward
schedules) has run; `GradSync.stage_done` then starts their bucketed all-reduce over the dp group,
while the schedule goes on with other stages and microbatches. Parameters that several stages share
(tied embeddings) are summed over the pipeline after the schedule's step, so theirs start only in
`finish`, which also waits for everything before the optimizer may read a gradient.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from torch import nn

from pp.comms.collectives import all_reduce_, wait_all

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["GradSync"]


class GradSync:
    """Averages this rank's gradients over its data-parallel replicas once per step.

    `stage_params` maps each local stage index to its (name, parameter) pairs; names in `deferred`
    (parameters shared by several stages) wait for `finish`. Every replica runs the same schedule,
    so the collectives start in the same order on all of them.
    """

    def __init__(self, stage_params: dict[int, list[tuple[str, nn.Parameter]]], group: ProcessGroup,
                 deferred: Iterable[str] = (), bucket_bytes: int = 25 * 2**20) -> None:
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        deferred = set(deferred)
        seen: set[int] = set()
        self._stage_params: dict[int, list[nn.Parameter]] = {}
        self._deferred: list[nn.Parameter] = []
        for stage in sorted(stage_params):
            mine = []
            for name, p in stage_params[stage]:
                if id(p) in seen:   # frozen ones too: thawed between steps they have gradients to average
                    continue
                seen.add(id(p))
                (self._deferred if name in deferred else mine).append(p)
            self._stage_params[stage] = mine
        self.group = group
        self.bucket_bytes = bucket_bytes
        self._handles: list = []
        self._started: list[int] = []
        self.last_order: list[int] = []   # stages in the order their sync started in the last step

    def stage_done(self, stage: int) -> None:
        """Start the all-reduce of `stage`'s gradients (its last backward of the step has run)."""
        self._started.append(stage)
        self._start(self._stage_params.get(stage, []))

    def finish(self) -> None:
        """Start what is left (shared parameters, stages no hook reported) and wait for all of it."""
        for stage, params in self._stage_params.items():
            if stage not in self._started:
                self._start(params)
        self._start(self._deferred)
        handles, self._handles = self._handles, []
        wait_all(handles)
        self.last_order, self._started = self._started, []

    def _start(self, params: list[nn.Parameter]) -> None:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            self._handles.extend(all_reduce_(grads, self.group, op="avg", bucket_bytes=self.bucket_bytes))
