"""Point-to-point transfers between pipeline ranks: batched tensor sends/receives and small objects.

Ranks here are ranks *within* the pipeline group; conversion to global ranks happens in one place.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def post(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]],
         group: dist.ProcessGroup | None) -> list:
    """Start all sends and receives of one batch together; returns their work handles.

    One batch goes to the backend as one group (NCCL group call), so sends and receives with the same
    peer inside it cannot block each other.
    """
    ops = [dist.P2POp(dist.isend, t, global_rank(group, peer), group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, global_rank(group, peer), group) for t, peer in recvs]
    if not ops:
        return []
    return dist.batch_isend_irecv(ops)


def _object_device(group: dist.ProcessGroup | None) -> torch.device:
    backend = dist.get_backend(group)
    if "gloo" in backend:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def send_object(obj: Any, peer: int, group: dist.ProcessGroup | None) -> None:
    """Blocking send of a small picklable object (tensor metadata); not for the hot path."""
    dist.send_object_list([obj], dst=global_rank(group, peer), group=group, device=_object_device(group))


def recv_object(peer: int, group: dist.ProcessGroup | None) -> Any:
    box = [None]
    dist.recv_object_list(box, src=global_rank(group, peer), group=group, device=_object_device(group))
    return box[0]


def max_all_reduce(values: Sequence[int], group: dist.ProcessGroup | None) -> list[int]:
    """Element-wise max of a few integers over the group, on the CPU when the group can (no device sync)."""
    device = _object_device(group)
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def sum_all_reduce_(t: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """In-place sum of `t` over the group (gradients of parameters shared by stages on several ranks)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def warm_up(group: dist.ProcessGroup | None, device: torch.device) -> None:
    """One collective on the device before any batched P2P: NCCL needs every rank of the group in its
    first call, and a P2P batch between two ranks would otherwise be that first call."""
    if device.type != "cpu" and dist.get_world_size(group) > 1:
        dist.all_reduce(torch.zeros(1, device=device), group=group)
