"""Parameters used by several stages (tied embeddings, say) train as one: after a step's last
backward, every stage holding a copy gets the summed gradient, in one all-reduce over the pipeline group.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

import torch

from ..comms import p2p
from ..parallel.wrapped import unwrap

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from ..stage.runtime import PipelineStage


def sync_shared_grads(stages: Iterable[PipelineStage], stage_to_rank: Mapping[int, int],
                      group: ProcessGroup | None, device: torch.device, check_values: bool = False) -> None:
    """Give every copy of a parameter shared by several stages the summed gradient (collective over
    `group`: every rank of the pipeline calls it after the step's last backward). `stages` are this
    rank's; a rank whose copy got no gradient contributes zeros (`device`).

    Two stages of one rank normally hold the same tensor (nothing to do), but stages built from
    deep-copied modules hold two: their gradients are summed on the rank too, and the sum written into
    each, so the copies train as one parameter as on separate ranks (they stay equal for any optimizer
    that updates both alike).

    `pipe_info.shared_params` names each by the model's first name for it (the splitter finds
    sharing by identity, whatever name each stage reads it under). Manual stages carry no pipe
    info, so nothing is summed for them: see `PipelineStage`."""
    stages = list(stages)
    info = stages[0].pipe_info
    if info is None or not info.shared_params:
        return
    copies: dict[str, list[torch.nn.Parameter]] = {}   # name -> this rank's distinct tensors for it
    for stage in stages:   # every name, aliases too: a stage may reach the parameter under another of its names
        for name, p in unwrap(stage.submod).named_parameters(remove_duplicate=False):
            if name in info.shared_params and all(p is not q for q in copies.setdefault(name, [])):
                copies[name].append(p)
    ranks_of = {name: sorted({stage_to_rank[s] for s in users}) for name, users in info.shared_params.items()}
    across = sorted(n for n, ranks in ranks_of.items() if len(ranks) > 1)    # the same list on every rank
    within = sorted(n for n in info.shared_params if n not in across and len(copies.get(n, ())) > 1)
    if not across and not within:
        return
    if check_values:
        _check_equal(copies, across, within, ranks_of, info.shared_params, group, device)
    sums = {name: _local_sum(copies.get(name, []), info.param_meta[name], device) for name in across + within}
    if across:
        # one dtype on every rank, whatever each holds: a rank with no copy knows only the traced dtype,
        # while the copies may since have been cast (train.precision bf16); sums are float32 or wider
        wide = torch.float64 if any(info.param_meta[n][1] == torch.float64 for n in across) else torch.float32
        buf = torch.cat([sums[name].reshape(-1).to(wide) for name in across])
        p2p.sum_all_reduce_(buf, group)
        offset = 0
        for name in across:
            shape = sums[name].shape
            n = shape.numel()
            sums[name] = buf[offset:offset + n].view(shape)
            offset += n
    for name in across + within:
        for p in copies.get(name, []):
            if not p.requires_grad:   # frozen: its .grad stays None, as in the unsplit model (AdamW would
                continue              # otherwise decay it and move its moments)
            if p.grad is None:
                p.grad = sums[name].to(p.dtype, copy=True)
            else:
                p.grad.copy_(sums[name])


def keep_one_accumulated(stages: Iterable[PipelineStage]) -> None:
    """Before a training step: of the copies of each shared parameter, only the one of its first stage
    keeps the gradient accumulated so far; the others' are zeroed. After the step
    `sync_shared_grads` sums the copies, so steps that accumulate (no `zero_grad` between them) add
    this step's gradient once: summing whole gradients again would count every earlier step once per
    copy. Local only (no communication); nothing to do where no copy holds a gradient."""
    stages = list(stages)
    info = stages[0].pipe_info
    if info is None or not info.shared_params:
        return
    owners = {}   # name -> the first stage's tensor, where that stage is on this rank
    for stage in stages:
        for name, p in unwrap(stage.submod).named_parameters(remove_duplicate=False):
            if stage.stage_index == min(info.shared_params.get(name, [-1])):
                owners[name] = p
    for stage in stages:
        for name, p in unwrap(stage.submod).named_parameters(remove_duplicate=False):
            if name in info.shared_params and p is not owners.get(name) and p.grad is not None:
                p.grad.zero_()


def _local_sum(params: list[torch.nn.Parameter], meta, device: torch.device) -> torch.Tensor:
    """The sum of this rank's gradients of one shared parameter (zeros, of the model's shape and dtype,
    where none has one)."""
    shape, dtype = meta
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(torch.Size(shape), dtype=dtype, device=device)
    out = grads[0].clone() if len(grads) > 1 else grads[0]
    for g in grads[1:]:
        out.add_(g)
    return out


def _local(p: torch.Tensor) -> torch.Tensor:
    t = p.detach()
    return t.to_local() if hasattr(t, "to_local") else t     # an FSDP2 shard: the same shard on every pp rank


def _fingerprint(p: torch.Tensor) -> torch.Tensor:
    t = _local(p).double()
    return torch.stack([t.sum(), t.square().sum()])


def _check_equal(copies: Mapping[str, list], across: list[str], within: list[str], ranks_of: Mapping,
                 users: Mapping[str, list[int]], group: ProcessGroup | None, device: torch.device) -> None:
    """Raise ValueError on every rank where a shared parameter's copies differ (one all-reduce when
    the parameter spans ranks)."""
    bad = [name for name in (*across, *within) if len(copies.get(name, ())) > 1
           and not all(torch.equal(_local(copies[name][0]), _local(q)) for q in copies[name][1:])]
    if across:
        import torch.distributed as dist

        rows = []
        for name in across:
            if copies.get(name):
                f = _fingerprint(copies[name][0])
                rows.append(torch.cat([f, -f]))
            else:
                rows.append(torch.full((4,), float("-inf"), dtype=torch.float64, device=device))
        flags = torch.tensor([float(n in bad) for n in across], dtype=torch.float64, device=device)
        buf = torch.cat([*rows, flags])
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
        got = buf.tolist()
        for i, name in enumerate(across):
            hi, neg_lo = got[4 * i:4 * i + 2], got[4 * i + 2:4 * i + 4]
            if any(h != -n for h, n in zip(hi, neg_lo)) or got[4 * len(across) + i] > 0:
                bad.append(name)
    for name in sorted(set(bad)):
        where = f"stages {users[name]} on ranks {ranks_of[name]}"
        raise ValueError(f"the parameter {name!r} that {where} share holds different values in different "
                         f"stages; shared copies must start equal (build the stages from one model, or copy "
                         f"the values into every stage before the first step)")
