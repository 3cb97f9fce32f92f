"""Functional collectives that return new tensors and trace into graphs, plus in-place gradient sync.

The functional ones are thin wrappers over `torch.ops._c10d_functional.*` followed by `wait_tensor`, so
eager code, `torch.export` and `torch.compile` all see the same two graph nodes. They are not
differentiable (use `pp.tp`'s wrappers for that); they never sync the host with the device on CUDA.
"""
from __future__ import annotations

from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "GroupLike", "REDUCE_OPS", "all_gather", "all_reduce", "all_reduce_", "broadcast", "group_name",
    "group_size", "reduce_scatter", "resolve_group",
]

# A ProcessGroup, None for the default (world) group, or (DeviceMesh, mesh dim name or index).
GroupLike = Union[dist.ProcessGroup, None, tuple]

REDUCE_OPS = ("sum", "avg", "product", "min", "max")
_DIST_OPS = {"sum": dist.ReduceOp.SUM, "product": dist.ReduceOp.PRODUCT,
             "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
_F = torch.ops._c10d_functional


def resolve_group(group: GroupLike = None) -> dist.ProcessGroup:
    """The ProcessGroup that `group` (ProcessGroup, None for world, or (DeviceMesh, dim)) stands for."""
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError("group=None means the default process group, but torch.distributed "
                               "is not initialised; call init_process_group first")
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    if isinstance(group, tuple) and len(group) == 2:
        from torch.distributed.device_mesh import DeviceMesh

        mesh, dim = group
        if isinstance(mesh, DeviceMesh) and isinstance(dim, (str, int)):
            return mesh.get_group(dim)
    raise TypeError(f"group must be a ProcessGroup, None or (DeviceMesh, dim name or index), "
                    f"got {group!r}")


def group_name(group: GroupLike = None) -> str:
    """The registered name of `group`, the argument `_c10d_functional` graph nodes take."""
    return str(resolve_group(group).group_name)


def group_size(group: GroupLike = None) -> int:
    """Number of ranks in `group`."""
    return dist.get_world_size(resolve_group(group))


def _check_op(op: str) -> str:
    if op not in REDUCE_OPS:
        raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")
    return op


def _backend_lacks_avg(pg: dist.ProcessGroup) -> bool:
    """Gloo has no AVG reduction; we emulate it with SUM and a division."""
    try:
        return "gloo" in str(dist.get_backend(pg))
    except RuntimeError:
        return False


def all_reduce(t: Tensor, op: str = "sum", group: GroupLike = None) -> Tensor:
    """Reduce `t` over `group` and return the result in a new tensor; `t` is unchanged."""
    op = _check_op(op)
    pg = resolve_group(group)
    if op == "avg" and _backend_lacks_avg(pg):
        return all_reduce(t, "sum", pg) / dist.get_world_size(pg)
    return _F.wait_tensor(_F.all_reduce(t, op, str(pg.group_name)))


def all_gather(t: Tensor, dim: int = 0, group: GroupLike = None) -> Tensor:
    """Concatenate every rank's `t` along `dim`, in rank order of `group`."""
    dim = _check_dim(t, dim)
    pg = resolve_group(group)
    n = dist.get_world_size(pg)
    out = _F.wait_tensor(_F.all_gather_into_tensor(t.contiguous(), n, str(pg.group_name)))
    if dim == 0 or n == 1:
        return out
    return torch.cat(torch.chunk(out, n, dim=0), dim=dim)


def reduce_scatter(t: Tensor, dim: int = 0, op: str = "sum", group: GroupLike = None) -> Tensor:
    """Reduce `t` over `group` and return this rank's 1/size chunk along `dim`."""
    op = _check_op(op)
    dim = _check_dim(t, dim)
    pg = resolve_group(group)
    n = dist.get_world_size(pg)
    if t.shape[dim] % n != 0:
        raise ValueError(f"reduce_scatter needs size {t.shape[dim]} of dim {dim} to divide by the "
                         f"group size {n}")
    if op == "avg" and _backend_lacks_avg(pg):
        return reduce_scatter(t, dim, "sum", pg) / n
    if dim != 0 and n > 1:
        t = torch.cat(torch.chunk(t, n, dim=dim), dim=0)
    return _F.wait_tensor(_F.reduce_scatter_tensor(t.contiguous(), op, n, str(pg.group_name)))


def broadcast(t: Tensor, src: int = 0, group: GroupLike = None) -> Tensor:
    """Return `group`-rank `src`'s `t` on every rank (`src` counts within `group`, as in c10d ops)."""
    pg = resolve_group(group)
    n = dist.get_world_size(pg)
    if not 0 <= src < n:
        raise ValueError(f"src must be a rank of the group, 0..{n - 1}, got {src}")
    return _F.wait_tensor(_F.broadcast(t.contiguous(), src, str(pg.group_name)))


def _check_dim(t: Tensor, dim: int) -> int:
    if not -t.dim() <= dim < max(t.dim(), 1):
        raise ValueError(f"dim {dim} is out of range for a tensor of shape {tuple(t.shape)}")
    return dim % max(t.dim(), 1)


class _CoalescedWork:
    """Handle of one flattened all-reduce: `wait()` waits, then copies the result back."""

    def __init__(self, work: Any, flat: Tensor, tensors: list[Tensor]) -> None:
        self._work, self._flat, self._tensors = work, flat, tensors

    def wait(self) -> bool:
        self._work.wait()
        offset = 0
        for t in self._tensors:
            n = t.numel()
            t.copy_(self._flat[offset:offset + n].view_as(t))
            offset += n
        return True


def all_reduce_(tensors: list[Tensor], group: GroupLike = None, op: str = "sum",
                bucket_bytes: int = 25 * 2**20) -> list:
    """Start an in-place all-reduce of `tensors` (e.g. gradients); return handles to `.wait()` on.

    Tensors of one device and dtype are packed into flat buckets of at most `bucket_bytes`, one
    collective per bucket (one copy in, one copy out at `wait()`); a tensor that fills a bucket on its
    own is reduced in place without a copy. "avg" divides before summing where the backend has no
    AVG (gloo), which also keeps low-precision sums in range. The values are only valid after every
    handle's `wait()`.
    """
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError(f"tensors must be a list of tensors, got {type(tensors).__name__}")
    op = _check_op(op)
    if op == "avg" and not all(t.is_floating_point() or t.is_complex() for t in tensors):
        raise ValueError("op='avg' needs floating-point tensors; reduce integers with 'sum'")
    pg = resolve_group(group)
    n = dist.get_world_size(pg)
    emulate_avg = op == "avg" and _backend_lacks_avg(pg)
    reduce_op = dist.ReduceOp.SUM if emulate_avg else _DIST_OPS.get(op, dist.ReduceOp.AVG)
    handles: list = []
    for bucket in _buckets([t for t in tensors if t.numel() > 0], bucket_bytes):
        if len(bucket) == 1 and bucket[0].is_contiguous():
            t = bucket[0]
            if emulate_avg:
                t.div_(n)
            handles.append(dist.all_reduce(t, reduce_op, pg, async_op=True))
            continue
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if emulate_avg:
            flat.div_(n)
        handles.append(_CoalescedWork(dist.all_reduce(flat, reduce_op, pg, async_op=True), flat, bucket))
    return handles


def wait_all(handles: list, what: str = "a data-parallel gradient all-reduce") -> None:
    """Wait for `all_reduce_`'s handles. A peer whose process ended (gloo: its connection closed) raises
    pp's PipelineAborted naming `what` this rank waited in, not gloo's raw line."""
    try:
        for h in handles:
            h.wait()
    except Exception as e:  # noqa: BLE001 - only a lost peer is translated
        from .abort import raise_named
        raise_named(e, what)


def _buckets(tensors: list[Tensor], bucket_bytes: int) -> list[list[Tensor]]:
    """Group tensors by (device, dtype), in order, into lists of at most `bucket_bytes` each."""
    open_buckets: dict[tuple, list[Tensor]] = {}
    sizes: dict[tuple, int] = {}
    out: list[list[Tensor]] = []
    for t in tensors:
        key = (t.device, t.dtype)
        nbytes = t.numel() * t.element_size()
        if key in open_buckets and sizes[key] + nbytes > bucket_bytes:
            out.append(open_buckets.pop(key))
        if key not in open_buckets:
            open_buckets[key], sizes[key] = [], 0
        open_buckets[key].append(t)
        sizes[key] += nbytes
    out.extend(open_buckets.values())
    return out
