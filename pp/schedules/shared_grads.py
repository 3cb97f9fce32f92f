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
                      group: ProcessGroup | None, device: torch.device) -> None:
    """Give every copy of a parameter shared by stages on several ranks the summed gradient
    (collective over `group`: every rank of the pipeline calls it after the step's last backward).
    `stages` are this rank's; a copy with no gradient contributes zeros (`device`).

    `pipe_info.shared_params` names each by the model's first name for it (the splitter finds
    sharing by identity, whatever name each stage reads it under). Manual stages carry no pipe
    info, so nothing is summed for them: see `PipelineStage`."""
    stages = list(stages)
    info = stages[0].pipe_info
    if info is None or not info.shared_params:
        return
    ranks_of = {name: sorted({stage_to_rank[s] for s in users}) for name, users in info.shared_params.items()}
    names = sorted(n for n, ranks in ranks_of.items() if len(ranks) > 1)
    if not names:
        return
    local = {}  # every name, aliases too: a stage may reach the parameter under another of its names
    for stage in stages:
        local.update(dict(unwrap(stage.submod).named_parameters(remove_duplicate=False)))
    flat = []
    for name in names:
        shape, dtype = info.param_meta[name]
        p = local.get(name)
        if p is not None and p.grad is not None:
            flat.append(p.grad.reshape(-1))
        else:
            flat.append(torch.zeros(int(torch.Size(shape).numel()), dtype=dtype, device=device))
    buf = torch.cat(flat)
    p2p.sum_all_reduce_(buf, group)
    offset = 0
    for name in names:
        shape, _ = info.param_meta[name]
        n = int(torch.Size(shape).numel())
        p = local.get(name)
        if p is not None:
            g = buf[offset:offset + n].view(shape)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        offset += n
