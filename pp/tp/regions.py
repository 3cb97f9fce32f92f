"""Differentiable tensor-parallel region boundaries (Megatron's f/g operators) for trainable stages.

Each function takes the group by its registered name (a string, so fx graphs can print it) and its
size and this rank's index in it, and pairs a forward collective with the backward one that keeps
gradients right: copy ↔ all-reduce, all-reduce ↔ copy, gather ↔ slice, slice ↔ gather,
reduce-scatter ↔ gather. Gathers and slices take uneven parts as `torch.chunk` cuts them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from pp.tp.layout import chunk_bounds

__all__ = ["copy_to_tp", "gather_from_tp", "reduce_from_tp", "reduce_scatter_to_tp", "slice_to_tp"]

_F = torch.ops._c10d_functional


def _all_reduce(x: Tensor, name: str) -> Tensor:
    return _F.wait_tensor(_F.all_reduce(x.contiguous(), "sum", name))


def _all_gather(x: Tensor, dim: int, size: int, name: str, length: int | None = None) -> Tensor:
    """The whole tensor from every rank's part along `dim`; parts cut as `chunk_bounds` cuts
    `length` things (uneven ones are padded to the largest for the one all-gather)."""
    dim %= x.dim()
    step = x.shape[dim] if length is None or length % size == 0 else -(-length // size)
    if x.shape[dim] < step:
        x = torch.cat([x, x.new_zeros((*x.shape[:dim], step - x.shape[dim], *x.shape[dim + 1:]))], dim)
    out = _F.wait_tensor(_F.all_gather_into_tensor(x.contiguous(), size, name))
    if dim != 0 and size > 1:
        out = torch.cat(torch.chunk(out, size, dim=0), dim=dim)
    return out if length is None or out.shape[dim] == length else out.narrow(dim, 0, length)


def _reduce_scatter(x: Tensor, dim: int, size: int, name: str) -> Tensor:
    if dim % x.dim() != 0 and size > 1:
        x = torch.cat(torch.chunk(x, size, dim=dim), dim=0)
    return _F.wait_tensor(_F.reduce_scatter_tensor(x.contiguous(), "sum", size, name))


def _local_slice(x: Tensor, dim: int, size: int, rank: int) -> Tensor:
    start, stop = chunk_bounds(x.shape[dim], size, rank)
    return x.narrow(dim, start, stop - start)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, name: str) -> Tensor:
        ctx.name = name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.name), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, name: str) -> Tensor:
        return _all_reduce(x, name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, size: int, rank: int, name: str, length: int | None) -> Tensor:
        ctx.args = (dim, size, rank)
        return _all_gather(x, dim, size, name, length)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _local_slice(grad, *ctx.args), None, None, None, None, None


class _SliceToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, size: int, rank: int, name: str) -> Tensor:
        ctx.args = (dim, size, name, x.shape[dim])
        return _local_slice(x, dim, size, rank)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather(grad, *ctx.args), None, None, None, None


class _ReduceScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, size: int, name: str) -> Tensor:
        ctx.args = (dim, size, name)
        return _reduce_scatter(x, dim, size, name)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather(grad, *ctx.args), None, None, None


def copy_to_tp(x: Tensor, name: str) -> Tensor:
    """Identity forward; all-reduce of the gradient (input of a column-parallel linear)."""
    return _CopyToTP.apply(x, name)


def reduce_from_tp(x: Tensor, name: str) -> Tensor:
    """All-reduce forward (output of a row-parallel linear); identity backward."""
    return _ReduceFromTP.apply(x, name)


def gather_from_tp(x: Tensor, dim: int, size: int, rank: int, name: str, length: int | None = None) -> Tensor:
    """All-gather along `dim` forward; this rank's slice of the gradient backward. `length` is the
    whole size along `dim` where the parts are uneven (`pp.tp.layout.chunk_bounds`)."""
    return _GatherFromTP.apply(x, dim, size, rank, name, length)


def slice_to_tp(x: Tensor, dim: int, size: int, rank: int, name: str) -> Tensor:
    """This rank's slice along `dim` forward (no communication); all-gather of the gradient backward."""
    return _SliceToTP.apply(x, dim, size, rank, name)


def reduce_scatter_to_tp(x: Tensor, dim: int, size: int, name: str) -> Tensor:
    """Reduce-scatter along `dim` forward (sequence parallelism); all-gather of the gradient backward."""
    return _ReduceScatterToTP.apply(x, dim, size, name)
