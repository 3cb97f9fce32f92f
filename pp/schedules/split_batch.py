"""How step() cuts a batch, its keywords and its target into microbatches.

`pp.microbatch.split_args_kwargs_into_chunks` is torch's function and splits each tensor on its own. A
step needs more: every split tensor must hold the batch's samples (a tensor of another length, such as
`cu_seqlens` with B + 1 entries, would be cut into meaningless pieces), the target follows the dim the
batch is split along (a seq-first batch split along dim 1 has a seq-first target), and each
microbatch's tensors get a version counter of their own, so an in-place op on one microbatch's input
or target (`nn.ReLU(inplace=True)` first, a loss masking padding with `t[t == pad] = -100`) does not
invalidate what autograd saved of another.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..microbatch import (DEFAULT_CHUNK_DIM, TensorChunkSpec, _flatten_with_specs, _is_spec_leaf, _Replicate,
                          split_args_kwargs_into_chunks, split_sizes)


def _dim_of(spec: Any) -> int | None:
    """The dim a spec leaf splits along; None for `_Replicate`."""
    if spec is _Replicate or isinstance(spec, _Replicate):
        return None
    return spec.split_dim if isinstance(spec, TensorChunkSpec) else DEFAULT_CHUNK_DIM


def split_batch(args: tuple, kwargs: dict, chunks: int, args_chunk_spec: Any = None,
                kwargs_chunk_spec: Any = None) -> tuple[list[tuple], list[dict], int]:
    """`args` and `kwargs` cut into `chunks` microbatches as step() cuts them: (args per microbatch,
    kwargs per microbatch, the batch's rows B).

    B is the size of the first split tensor (positional before keyword) along its split dim. Every
    other split tensor must hold B rows, or k × B (one row per token, flattened: then microbatch m gets
    k × b_m rows, b_m its share of B as `torch.tensor_split` cuts it), or be a smaller batch of its own
    that splits evenly into the microbatches (torch splits each tensor on its own: 4 rows for 4 microbatches
    give one each). ValueError naming the tensor otherwise (such as `cu_seqlens` with B + 1 entries):
    give it whole to every microbatch with `_Replicate` in the schedule's args/kwargs_chunk_spec. Each
    microbatch's tensors have version counters of their own (`own_versions`).
    """
    mb_args, mb_kwargs = split_args_kwargs_into_chunks(tuple(args), dict(kwargs), chunks, args_chunk_spec,
                                                       kwargs_chunk_spec)
    if isinstance(kwargs_chunk_spec, dict):
        kwargs_chunk_spec = {k: kwargs_chunk_spec.get(k) for k in kwargs}
    named = []
    for tree, spec, name in ((tuple(args), args_chunk_spec, "args"), (dict(kwargs), kwargs_chunk_spec, "kwargs")):
        leaves, _, specs = _flatten_with_specs(tree, spec, name)
        named.extend((path, value, _dim_of(s)) for (path, value), s in zip(leaves, specs))
    split = [(i, path, value, dim) for i, (path, value, dim) in enumerate(named)
             if isinstance(value, torch.Tensor) and value.dim() > 0 and dim is not None]
    rows = split[0][2].size(split[0][3]) if split else 0
    refollow: dict[int, tuple[int, int]] = {}
    for i, path, value, dim in split[1:]:
        size = value.size(dim)
        if size == rows:
            continue
        if size % rows:
            if size < rows and size % chunks == 0:   # a smaller batch of its own, cut evenly as torch cuts it
                continue
            raise ValueError(f"{path} has {size} rows along dim {dim}, but the batch has {rows} ({split[0][1]}): "
                             f"neither one (or the same whole number of) rows per sample nor a batch of its own "
                             f"that splits evenly into {chunks} microbatches, it would be cut into pieces of "
                             f"{', '.join(map(str, split_sizes(size, chunks)))} rows that belong to no microbatch; "
                             f"give it whole to every microbatch with _Replicate in the schedule's "
                             f"{path.split('[')[0]}_chunk_spec")
        if dim == 0 and split[0][3] != 0:   # k rows per sample along dim 0 of a batch split along another dim:
            raise ValueError(f"{path} has {size} rows along dim 0, {size // rows} per sample of the batch's {rows} "
                             f"({split[0][1]} is split along dim {split[0][3]}): flattened in an order pp cannot "
                             f"tell (seq-first rows interleave the samples), it has no cut that follows the "
                             f"batch; lay it out as the batch and split it along dim {split[0][3]} "
                             f"({path.split('[')[0]}_chunk_spec), or give it whole with _Replicate")
        sizes = [size // rows * b for b in split_sizes(rows, chunks)]
        if sizes != split_sizes(size, chunks):
            refollow[i] = (dim, sizes)
    if refollow:
        mb_args, mb_kwargs = _refollow(mb_args, mb_kwargs, named, refollow, len(pytree.tree_leaves(tuple(args))))
    return own_versions(mb_args), own_versions(mb_kwargs), rows


def _refollow(mb_args: list, mb_kwargs: list, named: list, refollow: dict, n_args: int) -> tuple[list, list]:
    """The microbatches with the tensors of k rows per sample re-cut to follow the batch's split."""
    parts = {i: named[i][1].split(sizes, dim=dim) for i, (dim, sizes) in refollow.items()}
    out_args, out_kwargs = [], []
    for m, (a, k) in enumerate(zip(mb_args, mb_kwargs)):
        a_leaves, a_tree = pytree.tree_flatten(a)
        k_leaves, k_tree = pytree.tree_flatten(k)
        leaves = a_leaves + k_leaves
        for i, p in parts.items():
            leaves[i] = p[m]
        out_args.append(pytree.tree_unflatten(leaves[:n_args], a_tree))
        out_kwargs.append(pytree.tree_unflatten(leaves[n_args:], k_tree))
    return out_args, out_kwargs


def batch_split_dim(args_chunk_spec: Any, kwargs_chunk_spec: Any) -> int:
    """The dim a schedule's specs split the batch along, which the target then follows: the first
    splitting leaf of `args_chunk_spec` (None there: dim 0), else of `kwargs_chunk_spec`, else 0."""
    for spec in (args_chunk_spec, kwargs_chunk_spec):
        if spec is None:
            continue
        leaves = pytree.tree_leaves(spec, is_leaf=_is_spec_leaf) if not _is_spec_leaf(spec) else [spec]
        for leaf in leaves:
            dim = _dim_of(leaf)
            if dim is not None:
                return dim
        if spec is args_chunk_spec:
            break
    return DEFAULT_CHUNK_DIM


def target_split_dim(target: Any, batch_dim: int) -> int:
    """The dim `target` is cut along: the batch's (`batch_split_dim`) where the target has it, so a target
    laid out as the input follows it; else dim 0 (one label per sample, `(B,)`)."""
    if batch_dim == DEFAULT_CHUNK_DIM:
        return DEFAULT_CHUNK_DIM
    first = next((x for x in pytree.tree_leaves(target) if isinstance(x, torch.Tensor)), None)
    if first is not None and first.dim() > 1 and -first.dim() <= batch_dim < first.dim():
        return batch_dim
    return DEFAULT_CHUNK_DIM


def split_target(target: Any, chunks: int, batch_dim: int) -> tuple[list, int]:
    """`target` cut into `chunks` microbatches along `target_split_dim`: (targets, the target's rows along
    that dim, 0 where it holds no tensor). ValueError naming the target where it cannot be cut."""
    dim = target_split_dim(target, batch_dim)
    spec = (TensorChunkSpec(dim),) if dim != DEFAULT_CHUNK_DIM else None
    try:
        targets = [t[0] for t in split_args_kwargs_into_chunks((target,), {}, chunks, spec)[0]]
    except ValueError as e:   # named as the caller passed it
        raise ValueError(str(e).replace("args[0]", "target")) from None
    first = next((x for x in pytree.tree_leaves(target) if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    rows = first.size(dim) if first is not None and -first.dim() <= dim < first.dim() else 0
    return own_versions(targets), rows


def own_version(t: Any) -> Any:
    """`t` as a tensor of the same storage and strides with a version counter of its own, where it is a
    view that does not require grad (a microbatch cut from the user's batch); else `t` itself. Views share
    their base's counter, so an in-place op on one microbatch made autograd refuse another's backward."""
    if not isinstance(t, torch.Tensor) or t._base is None or t.requires_grad or type(t) is not torch.Tensor:
        return t
    with torch.no_grad():
        return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def own_versions(chunks: list) -> list:
    """`own_version` for every tensor of every microbatch."""
    return [pytree.tree_map(own_version, c) for c in chunks]
