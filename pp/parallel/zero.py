"""Optimizer state, gradients and parameters sharded over the data-parallel replicas (ZeRO 1, 2, 3).

DeepSpeed's numbering: `zero: 1` keeps gradients averaged by `GradSync` on every replica and shards the
optimizer state with torch's `ZeroRedundancyOptimizer` (each replica updates the parameters it owns and
broadcasts them). `zero: 2` and `3` keep, per parameter, a flat master shard of 1/dp on each replica
(`ShardedParams`), in the parameter's dtype (float32 under fp32 and bf16-mixed, bfloat16 under bf16):
gradients are reduce-scattered into the shards after the schedule's step and the optimizer updates only
the shards; the whole parameters are all-gathered at the start of each step where the shards changed
(as FSDP2 does with `reshard_after_forward=False`, the setting torchtitan uses under pipelining, where
microbatches interleave), and at `3` their storage is freed again after the step. At `2` they are
gathered right after each step of the optimizer `build_optimizer` made (as DeepSpeed does), so between
steps they hold the updated values.
ZeroRedundancyOptimizer talks to torch.distributed itself; the shards use pp.comms collectives.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from pp.comms.collectives import all_gather, reduce_scatter
from pp.parallel.released import release_class, restore_class

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ZERO_LEVELS", "check_zero", "ShardedParams", "zero_optimizer"]

ZERO_LEVELS = (0, 1, 2, 3)


def check_zero(zero: object, dp: int, key: str = "zero") -> int:
    """The ZeRO level to run: `zero` itself, or 0 (with a warning that says so) when dp is 1.
    ValueError unless `zero` is one of 0, 1, 2, 3."""
    if isinstance(zero, bool) or not isinstance(zero, int) or zero not in ZERO_LEVELS:
        raise ValueError(f"{key}={zero!r} is not a ZeRO level; expected one of 0, 1, 2, 3 (DeepSpeed's "
                         f"numbering: 1 shards optimizer state, 2 also gradients, 3 also parameters)")
    if zero and dp == 1:
        warnings.warn(f"{key}={zero} with dp=1 is a no-op: there are no data-parallel replicas to shard "
                      f"over (training runs as {key}=0)", stacklevel=3)
        return 0
    return int(zero)  # type: ignore[arg-type]


def zero_optimizer(param_groups: list[dict], optimizer_class: type, group: ProcessGroup,
                   **defaults: Any) -> torch.optim.Optimizer:
    """ZeRO 1: torch's ZeroRedundancyOptimizer of `optimizer_class` over the dp `group`."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(param_groups, optimizer_class=optimizer_class, process_group=group, **defaults)


def owned_by(optimizer: torch.optim.Optimizer, param: torch.Tensor, dp_rank: int) -> bool:
    """Whether replica `dp_rank` updates (and checkpoints the optimizer state of) `param` under ZeRO 1."""
    return optimizer._param_to_rank[param] == dp_rank  # type: ignore[attr-defined]


def local_state(optimizer: torch.optim.Optimizer) -> dict:
    """The per-parameter state dict of the optimizer that updates this replica's parameters."""
    inner = getattr(optimizer, "optim", None)
    return (inner if isinstance(inner, torch.optim.Optimizer) else optimizer).state


def _owns_storage(p: torch.Tensor) -> bool:
    """Whether `p` is contiguous and spans its whole storage from offset 0 (no view of a larger tensor)."""
    return (p.is_contiguous() and p.storage_offset() == 0
            and p.untyped_storage().nbytes() == p.numel() * p.element_size())


class ShardedParams:
    """ZeRO 2/3 for this rank's parameters: a master shard of each (1/dp of its flat values, padded, in
    its dtype), whose `.grad` gets the reduce-scattered average gradient and which the optimizer updates.

    `params` are (name, parameter) pairs, each parameter once; `free` (ZeRO 3) releases the whole
    parameters' storage between steps.
    """

    def __init__(self, params: Iterable[tuple[str, nn.Parameter]], group: ProcessGroup, dp: int, dp_rank: int,
                 free: bool) -> None:
        self.group, self.dp, self.dp_rank, self.free = group, dp, dp_rank, free
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.masters: list[nn.Parameter] = []
        for name, p in params:   # frozen ones too: they may be thawed between steps (and ZeRO 3 frees them)
            if free and not _owns_storage(p):   # release/gather resize the storage: it must be p's alone
                p.data = p.detach().clone(memory_format=torch.contiguous_format)
            chunk = math.ceil(p.numel() / dp)
            flat = torch.zeros(chunk * dp, dtype=p.dtype, device=p.device)
            flat[:p.numel()] = p.detach().reshape(-1)
            self.names.append(name)
            self.params.append(p)
            self.masters.append(nn.Parameter(flat[dp_rank * chunk:(dp_rank + 1) * chunk].clone()))
        self.master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        # per parameter: its master's version when it was last gathered while frozen (None: trainable then)
        self._frozen_at: list[int | None] = [None] * len(self.params)
        self.gathered = True    # whether the whole parameters hold storage (not after `release`)
        # the masters' versions when the whole parameters last matched them (see `stale`): now, as built
        self._versions: list[int] = [m._version for m in self.masters]
        if free:
            self.release()

    # ------------------------------------------------------------------------- per step
    def gather(self) -> None:
        """Whole parameters from the master shards (collective over the dp group). A frozen parameter
        that was frozen at the last gather too, whose master has not been written since (`load_whole`)
        and whose storage is held (ZeRO 2) is left as it is: no optimizer step touched it (it had no
        gradient), so a frozen base is not sent every step. The same parameters on every replica."""
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            restore_class(p)
            freed = p.untyped_storage().size() == 0
            if not (freed or p.requires_grad) and self._frozen_at[i] == m._version:
                continue
            whole = all_gather(m.detach(), 0, self.group)[:p.numel()].view(p.shape)
            with torch.no_grad():
                if freed:
                    p.untyped_storage().resize_(p.numel() * p.element_size())
                p.copy_(whole)
            self._frozen_at[i] = None if p.requires_grad else m._version
        self.gathered = True
        self._versions = [m._version for m in self.masters]

    def stale(self) -> bool:
        """Whether the whole parameters lag the master shards: released (ZeRO 3), or a shard written
        since the last `gather` (an optimizer step)."""
        return not self.gathered or any(m._version != v for m, v in zip(self.masters, self._versions))

    def reduce_grads(self) -> None:
        """Each master's `.grad`: its shard of the dp average of its parameter's gradient, added to what
        it holds (None after zero_grad; frozen parameters' stay None); the whole gradients are let go
        (collective over the dp group)."""
        for p, m in zip(self.params, self.masters):
            if not p.requires_grad:   # frozen (at the build or since): no gradient, as in the unsplit model
                p.grad = None
                continue
            g = p.grad
            flat = torch.zeros(m.numel() * self.dp, dtype=m.dtype, device=m.device)
            if g is not None:
                flat[:p.numel()] = g.reshape(-1)
            shard = reduce_scatter(flat, 0, "avg", self.group)
            # steps without zero_grad between them accumulate, as .grad does (zero_grad clears the masters)
            m.grad = shard if m.grad is None else m.grad.add_(shard)
            p.grad = None

    def release(self) -> None:
        """ZeRO 3: free the whole parameters' storage (shapes stay); until `gather`, reading their values
        raises a RuntimeError that says where they are (`pp.parallel.released`)."""
        if self.free:
            for name, p in zip(self.names, self.params):
                p.untyped_storage().resize_(0)
                release_class(p, name)
            self.gathered = False

    # ------------------------------------------------------------------ whole tensors
    def whole(self, name: str, shard: torch.Tensor) -> torch.Tensor:
        """The whole tensor of parameter `name` from this rank's `shard` of it (or of its optimizer
        state); collective over the dp group."""
        p = self.params[self.names.index(name)]
        return all_gather(shard.detach(), 0, self.group)[:p.numel()].view(p.shape)

    def master(self, name: str) -> nn.Parameter:
        """The master shard of parameter `name`."""
        return self.masters[self.names.index(name)]

    def shard(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """This rank's flat shard of the whole tensor `whole` of parameter `name`."""
        m = self.masters[self.names.index(name)]
        flat = torch.zeros(m.numel() * self.dp, dtype=m.dtype, device=m.device)
        flat[:whole.numel()] = whole.reshape(-1).to(m.device, m.dtype)
        return flat[self.dp_rank * m.numel():(self.dp_rank + 1) * m.numel()]

    def load_whole(self, name: str, whole: torch.Tensor) -> None:
        """Set parameter `name` (its master shard, and the whole parameter where it is held)."""
        i = self.names.index(name)
        with torch.no_grad():
            self.masters[i].copy_(self.shard(name, whole))
            if self.gathered:
                self.params[i].copy_(whole.to(self.params[i].device, self.params[i].dtype))
