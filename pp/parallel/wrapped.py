"""Stage modules the user wrapped for data parallelism (torch DDP, FSDP2 `fully_shard`): one gradient sync
per step, after the stage's last backward (B, or W in split-backward schedules), whatever the schedule.

DDP and FSDP2 sync from autograd hooks, once per backward call; a pipeline runs several microbatches'
backwards per step, and schedules with a separate W compute weight gradients without autograd (no hook
fires). So, as torch.distributed.pipelining does, the hooks are kept from syncing during the step, and
the sync runs once when the stage's gradients are final:

* DDP: every forward runs through the wrapper with `require_backward_grad_sync` off (DDP's `no_sync`:
  the reducer is never armed, its hooks do nothing), and after the stage's last backward its gradients
  are averaged over DDP's process group here (`pp.comms` all-reduce, in DDP's bucket size; with
  `find_unused_parameters=True` a gradient that no replica has stays None, as DDP leaves it). This is the
  same arithmetic as DDP's reducer, by one path for B and I/W schedules alike; DDP comm hooks are not
  run. A step run while the user holds `ddp.no_sync()` only accumulates, as with DDP.
* FSDP2: before the step every FSDP module of the stage is unsharded (all-gather) and told not to
  reduce or reshard after backward; after the stage's last backward the flags are set back and each
  parameter group's post-backward runs (reduce-scatter into the sharded `.grad`, reshard), then the
  root's final callback, as torch's stage does in `perform_reduce_grad`.
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from pp.comms.collectives import all_reduce_, wait_all
from pp.comms.p2p import max_all_reduce

__all__ = ["DDPStage", "FSDPStage", "StepSync", "stage_wrapper", "unwrap"]


def _ddp_class() -> type | None:
    module = sys.modules.get("torch.nn.parallel.distributed")
    return getattr(module, "DistributedDataParallel", None)


def _fsdp_class() -> type | None:
    # Only where the user imported FSDP (fully_shard cannot have run otherwise): importing it costs seconds.
    module = sys.modules.get("torch.distributed.fsdp")
    return getattr(module, "FSDPModule", None)


class DDPStage:
    """A stage module wrapped by `torch.nn.parallel.DistributedDataParallel`."""

    def __init__(self, module: nn.Module):
        if getattr(module, "static_graph", False):
            raise ValueError("PipelineStage cannot run a DistributedDataParallel module built with "
                             "static_graph=True (its first backward would all-reduce every microbatch's "
                             "partial gradient); build the DDP wrapper with static_graph=False")
        if getattr(module, "_comm_hooks", None):
            warnings.warn("PipelineStage averages a DDP-wrapped stage's gradients itself, once per step; "
                          "the DDP communication hook registered on it is not run", stacklevel=4)
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._sync_wanted = True
        self._handles: list = []

    def begin(self, training: bool) -> None:
        """Before a step: the reducer stays unarmed for every forward and backward of the step."""
        self._sync_wanted = bool(self.module.require_backward_grad_sync)
        self.module.require_backward_grad_sync = False

    def backward_done(self) -> None:
        """Start averaging the stage's gradients over DDP's process group (waited for in `end`)."""
        if not self._sync_wanted:
            return
        group = self.module.process_group
        params = self.params
        if getattr(self.module, "find_unused_parameters", False):
            # A gradient no replica computed stays None, as DDP leaves it; the others all take part.
            anywhere = max_all_reduce([int(p.grad is not None) for p in params], group)
            params = [p for p, used in zip(params, anywhere) if used]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket = int(getattr(self.module, "bucket_bytes_cap", 25 * 2**20))
        self._handles.extend(all_reduce_([p.grad for p in params], group, op="avg", bucket_bytes=bucket))

    def end(self, ok: bool) -> None:
        """After a step (`ok`: it completed): wait for the averages, give DDP its flag back."""
        handles, self._handles = self._handles, []
        if ok:
            wait_all(handles, "a wrapped stage's data-parallel gradient all-reduce")
        self.module.require_backward_grad_sync = self._sync_wanted


class FSDPStage:
    """A stage module with FSDP2 (`fully_shard`) applied to it or to modules inside it."""

    def __init__(self, module: nn.Module, fsdp_modules: list[nn.Module]):
        self.module = module
        self.fsdp_modules = fsdp_modules

    def begin(self, training: bool) -> None:
        """Before a training step: unshard, and keep backward from reducing or resharding until the end."""
        if not training:
            return
        for m in self.fsdp_modules:
            m.set_is_last_backward(False)
            m.set_reshard_after_backward(False, recurse=False)
            m.set_requires_gradient_sync(False, recurse=False)
            m.unshard()

    def backward_done(self) -> None:
        """Reduce-scatter the stage's accumulated gradients into the sharded `.grad`, and reshard."""
        states = []
        for m in self.fsdp_modules:
            m.set_is_last_backward(True)
            m.set_reshard_after_backward(True, recurse=False)
            m.set_requires_gradient_sync(True, recurse=False)
            states.append(_fsdp_state(m))
        for state in states:
            for group in _param_groups(state):
                group.post_backward()
        for state in states:
            if getattr(state, "_is_root", False):
                state._root_post_backward_final_callback()

    def end(self, ok: bool) -> None:
        return None


def _fsdp_state(module: nn.Module) -> Any:
    get = getattr(module, "_get_fsdp_state", None)
    if get is not None:
        return get()
    from torch.distributed.fsdp import fully_shard

    return fully_shard.state(module)


def _param_groups(state: Any) -> list:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)   # torch before grouped fully_shard
    return [group] if group is not None else []


def stage_wrapper(module: nn.Module) -> DDPStage | FSDPStage | None:
    """The data-parallel wrapper of a stage module: DDPStage for a DDP module, FSDPStage where
    `fully_shard` was applied to it or inside it, None for a plain module."""
    ddp = _ddp_class()
    if ddp is not None and isinstance(module, ddp):
        return DDPStage(module)
    fsdp = _fsdp_class()
    if fsdp is not None:
        found = [m for m in module.modules() if isinstance(m, fsdp)]
        if found:
            return FSDPStage(module, found)
    return None


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (parameter names without "module."); others as they are."""
    ddp = _ddp_class()
    return module.module if ddp is not None and isinstance(module, ddp) else module


class StepSync:
    """The wrapped stages of one schedule on this rank: called before the step, after each stage's last
    backward of the step, and after the step. Every replica runs the same schedule, so the collectives
    start in the same order on all of them."""

    def __init__(self, wrappers: dict[int, DDPStage | FSDPStage]):
        self.wrappers = wrappers
        self._done: set[int] = set()
        self._training = False

    @classmethod
    def of(cls, stages: Iterable[Any]) -> StepSync | None:
        """For PipelineStage objects (their `dp_wrapper`); None when none is wrapped."""
        found = {s.stage_index: s.dp_wrapper for s in stages if getattr(s, "dp_wrapper", None) is not None}
        return cls(found) if found else None

    def begin(self, training: bool) -> None:
        self._done.clear()
        self._training = training
        for w in self.wrappers.values():
            w.begin(training)

    def stage_done(self, stage: int) -> None:
        """Stage `stage`'s last backward of the step has run: start its gradient sync."""
        w = self.wrappers.get(stage)
        if w is not None and self._training and stage not in self._done:
            self._done.add(stage)
            w.backward_done()

    def end(self, ok: bool) -> None:
        """After the step: sync stages no hook reported (when it completed), then wait for everything."""
        try:
            if ok and self._training:
                for stage in sorted(self.wrappers):
                    self.stage_done(stage)
        finally:
            for w in self.wrappers.values():
                w.end(ok)
            self._training = False

