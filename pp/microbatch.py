"""Split a batch's args/kwargs into microbatches and merge per-microbatch outputs back.

Names and signatures follow `torch.distributed.pipelining.microbatch`. Tensors are split with
`tensor_split` (views, no copies) along dim 0 or their spec's dim; anything else is replicated.
"""
from __future__ import annotations

import functools
import inspect
import operator

from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["DEFAULT_CHUNK_DIM", "TensorChunkSpec", "merge_chunks", "split_args_kwargs_into_chunks", "sum_reducer"]

DEFAULT_CHUNK_DIM = 0


class TensorChunkSpec:
    """Split (or merge) a tensor along `split_dim`."""

    def __init__(self, split_dim: int) -> None:
        if not isinstance(split_dim, int) or isinstance(split_dim, bool):
            raise TypeError(f"TensorChunkSpec split_dim must be an int, got {split_dim!r}")
        self.split_dim = split_dim

    def __repr__(self) -> str:
        return f"{type(self).__module__}.{type(self).__name__}({self.split_dim})"

    def __str__(self) -> str:
        return f"TensorChunkSpec({self.split_dim})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TensorChunkSpec) and other.split_dim == self.split_dim

    def __hash__(self) -> int:
        return hash((TensorChunkSpec, self.split_dim))

    @staticmethod
    def from_tuple(chunk_dims: tuple[int, ...]) -> tuple:
        """A tuple of specs from a tuple of dims: `from_tuple((0, 0, 1))`."""
        return tuple(TensorChunkSpec(d) for d in chunk_dims)

    @staticmethod
    def from_dict(chunk_dims: dict[str, int]) -> dict:
        """A dict of specs from a dict of dims: `from_dict({"ids": 0, "mask": 1})`."""
        return {k: TensorChunkSpec(d) for k, d in chunk_dims.items()}


class _Replicate:
    """Spec leaf meaning: give every microbatch this value unchanged (the class or an instance)."""


class _CustomReducer:
    """Merge spec leaf (torch's name): the merged value is `reduce_fn(...reduce_fn(init_value, v0)..., vN)`
    over the microbatches' values, e.g. `sum_reducer` adds them (a summed loss). Merging only: a
    reducer cannot split an input."""

    def __init__(self, init_value: Any, reduce_fn: Any):
        self.init_value = init_value
        self.reduce_fn = reduce_fn


class _LossReducer(_CustomReducer):
    """A reducer of losses (torch's class for `sum_reducer`)."""


sum_reducer = _LossReducer(torch.tensor(0.0), operator.add)


def _is_spec_leaf(x: Any) -> bool:
    return x is None or x is _Replicate or isinstance(x, (TensorChunkSpec, _Replicate, _CustomReducer))


def split_args_kwargs_into_chunks(
    args: tuple,
    kwargs: dict | None,
    chunks: int,
    args_chunk_spec: tuple | None = None,
    kwargs_chunk_spec: dict | None = None,
) -> tuple[list[tuple], list[dict]]:
    """Split `args` and `kwargs` into `chunks` microbatches; returns (args per chunk, kwargs per chunk).

    Specs are pytrees matching (a prefix of) the args/kwargs with `TensorChunkSpec`, `_Replicate` or
    None (= split tensors along dim 0) leaves; a kwargs spec may leave keys out. Non-tensors are
    replicated. Each tensor is split on its own, as torch does: `x` of 16 rows and `t` of 4 rows give
    chunks of 4 and 1 rows. ValueError where a tensor has fewer than `chunks` entries along its split
    dim (or no such dim).
    """
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunks must be a positive int, got {chunks!r}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple, got {type(args).__name__}")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict or None, got {type(kwargs).__name__}")
    if isinstance(kwargs_chunk_spec, dict):
        extra = sorted(set(kwargs_chunk_spec) - set(kwargs), key=str)
        if extra:
            raise ValueError(f"kwargs_chunk_spec names {extra} that are not in kwargs {sorted(kwargs, key=str)}")
        kwargs_chunk_spec = {k: kwargs_chunk_spec.get(k) for k in kwargs}

    args_leaves, args_tree, args_specs = _flatten_with_specs(args, args_chunk_spec, "args")
    kw_leaves, kw_tree, kw_specs = _flatten_with_specs(kwargs, kwargs_chunk_spec, "kwargs")
    split_leaves = _split_leaves(args_leaves + kw_leaves, args_specs + kw_specs, chunks)

    n_args = len(args_leaves)
    args_split = [pytree.tree_unflatten(leaves[:n_args], args_tree) for leaves in split_leaves]
    kwargs_split = [pytree.tree_unflatten(leaves[n_args:], kw_tree) for leaves in split_leaves]
    return args_split, kwargs_split


def merge_chunks(chunks: list, chunk_spec: Any, *, spec_name: str = "chunk_spec",
                 default_dim: int = DEFAULT_CHUNK_DIM, chunk_rows: list[int] | None = None) -> Any:
    """Merge per-microbatch values into one: tensors are concatenated along their spec's dim (default 0).

    `chunk_spec` is a pytree matching (a prefix of) one chunk, or None for the default everywhere.
    Non-tensor leaves, and leaves whose spec is `_Replicate`, take the first chunk's value; a leaf whose
    spec is a `_CustomReducer` (`sum_reducer`) is reduced over the chunks.
    0-dim tensors (a loss a model returns next to its logits, e.g. `ModelOutput(loss=, logits=)`) cannot
    be concatenated: floating-point ones are averaged over the chunks, each weighted by its chunk's rows
    (read off the chunk's first tensor that is split) where the chunks differ in rows, as `step()`
    weights the gradients: the batch's mean for a loss that is a mean over rows; others (counts, flags)
    are stacked into a 1-dim tensor with one value per chunk.
    `default_dim`: the dim a leaf without a spec is merged along where it has more than one dim (a
    schedule whose batch is split along dim 1 merges its outputs so) and, given `chunk_rows` (each
    chunk's samples), where its size there is the chunk's (a pooled (B, C) output merges along dim 0);
    dim 0 otherwise.
    """
    if not isinstance(chunks, (list, tuple)) or len(chunks) == 0:
        raise ValueError(f"merge_chunks needs a non-empty list of chunks, got {chunks!r}")
    first_leaves, tree = pytree.tree_flatten(chunks[0])
    check_merge_spec(chunk_spec, chunks[0], spec_name)
    specs = _broadcast_spec(chunk_spec, tree, spec_name, "the output")
    per_chunk = [first_leaves]
    for i, chunk in enumerate(chunks[1:], start=1):
        leaves, other_tree = pytree.tree_flatten(chunk)
        if other_tree != tree:
            raise ValueError(f"chunk {i} has structure {other_tree} but chunk 0 has {tree}")
        per_chunk.append(leaves)

    paths = _leaf_paths(chunks[0], "output")
    if default_dim != DEFAULT_CHUNK_DIM:   # where a leaf's sizes there are the microbatches' (not pooled)
        specs = [TensorChunkSpec(default_dim) if s is None and all(
                     isinstance(c[j], torch.Tensor) and c[j].dim() > 1 and -c[j].dim() <= default_dim < c[j].dim()
                     and (chunk_rows is None or c[j].size(default_dim) == r) for c, r in
                     zip(per_chunk, chunk_rows or [None] * len(per_chunk))) else s
                 for j, (s, v) in enumerate(zip(specs, first_leaves))]
    rows = _chunk_rows(per_chunk, specs)
    merged = []
    for j, spec in enumerate(specs):
        values = [leaves[j] for leaves in per_chunk]
        first = values[0]
        if isinstance(spec, _CustomReducer):
            merged.append(functools.reduce(spec.reduce_fn, values, spec.init_value))
            continue
        if not isinstance(first, torch.Tensor) or spec is _Replicate or isinstance(spec, _Replicate):
            merged.append(first)
            continue
        if first.dim() == 0:
            if any(v.dim() != 0 for v in values):
                raise ValueError(f"{paths[j]} is a 0-dim tensor in chunk 0 but not in every chunk: "
                                 f"shapes {[tuple(v.shape) for v in values]}")
            stacked = torch.stack(values)
            if not (first.is_floating_point() or first.is_complex()):
                merged.append(stacked)
            elif rows is None:
                merged.append(stacked.mean())
            else:   # Python weights: no host-to-device copy
                total = sum(rows)
                merged.append(sum(v * (r / total) for v, r in zip(values, rows)))
            continue
        dim = spec.split_dim if isinstance(spec, TensorChunkSpec) else DEFAULT_CHUNK_DIM
        merged.append(torch.cat(values, dim=dim))
    return pytree.tree_unflatten(merged, tree)


def _flatten_with_specs(tree: Any, spec: Any, name: str) -> tuple[list, pytree.TreeSpec, list]:
    """Leaves of `tree`, its structure, and one spec per leaf (None = default)."""
    leaves, treespec = pytree.tree_flatten(tree)
    specs = _broadcast_spec(spec, treespec, f"{name}_chunk_spec", name)
    paths = _leaf_paths(tree, name)
    return list(zip(paths, leaves)), treespec, specs


def _broadcast_spec(spec: Any, treespec: pytree.TreeSpec, spec_name: str, tree_name: str) -> list:
    """One spec leaf per tree leaf; `spec` may be a prefix of the tree (a leaf spec covers a subtree)."""
    if spec is None:
        return [None] * treespec.num_leaves
    specs = pytree._broadcast_to_and_flatten(spec, treespec, is_leaf=_is_spec_leaf)
    if specs is None:
        tree = pytree.tree_unflatten([torch.empty(0)] * treespec.num_leaves, treespec)
        where, spec_part, tree_part = _first_mismatch(spec, tree, tree_name) or (tree_name, spec, tree)
        raise ValueError(f"{spec_name} {spec!r} does not match {tree_name}: at {where} the spec is "
                         f"{_shape_words(spec_part)} and {where} is {_shape_words(tree_part)}; give one spec per "
                         f"entry (None for the default), or one spec for all")
    for s in specs:
        if not _is_spec_leaf(s):
            raise TypeError(f"{spec_name} leaves must be TensorChunkSpec, _Replicate, a _CustomReducer (merging "
                            f"only) or None, got {s!r}")
    return specs


def _shape_words(tree: Any) -> str:
    """A pytree's top level in words: "a tuple of 2", "a dict with keys ['mask']", "a tensor"."""
    if isinstance(tree, dict):
        return f"a dict with keys {sorted(tree, key=str)}"
    if isinstance(tree, (tuple, list)):
        return f"a {type(tree).__name__} of {len(tree)}"
    if isinstance(tree, torch.Tensor):
        return "a tensor"
    return "one spec" if _is_spec_leaf(tree) else type(tree).__name__


def _first_mismatch(spec: Any, tree: Any, path: str) -> tuple[str, Any, Any] | None:
    """Where a spec first departs from the tree it should match (a prefix of): (path, spec part, tree
    part); None where this walk finds none (dicts, tuples and lists only)."""
    if _is_spec_leaf(spec):
        return None
    if isinstance(tree, dict) and isinstance(spec, dict) and set(spec) == set(tree):
        parts = [(spec[k], tree[k], f"{path}[{k!r}]") for k in tree]
    elif isinstance(tree, (tuple, list)) and type(spec) is type(tree) and len(spec) == len(tree):
        parts = [(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(spec, tree))]
    else:
        return path, spec, tree
    return next((m for m in (_first_mismatch(*p) for p in parts) if m is not None), None)


def check_merge_spec(spec: Any, example: Any, spec_name: str = "output_merge_spec") -> None:
    """ValueError where `spec` cannot merge outputs shaped as `example` (one microbatch's output: tensors,
    or anything with a `.dim()`, such as the traced graph's fake tensors): its structure does not match,
    or it names a dim a tensor does not have. One sentence naming the spec, the output and the dim."""
    leaves, treespec = pytree.tree_flatten(example)
    specs = _broadcast_spec(spec, treespec, spec_name, "the output")
    for path, value, s in zip(_leaf_paths(example, "output"), leaves, specs):
        if isinstance(s, TensorChunkSpec) and hasattr(value, "dim") and value.dim() > 0:
            if not -value.dim() <= s.split_dim < value.dim():
                shape = ", ".join(str(d) if isinstance(d, int) else "*" for d in value.shape)
                raise ValueError(f"{spec_name} merges {path} along dim {s.split_dim}, but it has "
                                 f"{value.dim()} dimensions (shape ({shape}))")


def _leaf_paths(tree: Any, name: str) -> list[str]:
    return [name + pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(tree)[0]]


def _split_leaves(named_leaves: list, specs: list, chunks: int) -> list[list]:
    """Rows of leaves, one row per chunk: tensors split along their dim (each on its own size, as
    torch does), everything else replicated."""
    columns = []
    for (path, value), spec in zip(named_leaves, specs):
        if isinstance(spec, _CustomReducer):
            raise TypeError(f"{path}: a _CustomReducer (such as sum_reducer) merges outputs; it cannot split "
                            f"an input (use TensorChunkSpec, _Replicate or None)")
        if type(value).__name__ == "BlockMask" and not (spec is _Replicate or isinstance(spec, _Replicate)):
            columns.append(split_block_mask(value, chunks, path))
            continue
        if not isinstance(value, torch.Tensor) or spec is _Replicate or isinstance(spec, _Replicate):
            columns.append([value] * chunks)
            continue
        dim = spec.split_dim if isinstance(spec, TensorChunkSpec) else DEFAULT_CHUNK_DIM
        if value.dim() == 0 or not -value.dim() <= dim < value.dim():
            raise ValueError(f"{path} has shape {tuple(value.shape)}, which has no dim {dim} to split along")
        size = value.size(dim)
        if size < chunks:
            raise ValueError(f"batch of {size} along dim {dim} cannot be split into {chunks} microbatches "
                             f"({path} has shape {tuple(value.shape)})")
        columns.append(value.tensor_split(chunks, dim=dim))
    return [[col[c] for col in columns] for c in range(chunks)]


def split_sizes(rows: int, chunks: int) -> list[int]:
    """The sizes `torch.tensor_split` cuts `rows` into (10 into 4: 3, 3, 2, 2), without a tensor."""
    q, r = divmod(rows, chunks)
    return [q + 1] * r + [q] * (chunks - r)


def _chunk_rows(per_chunk: list[list], specs: list) -> list[int] | None:
    """Each chunk's rows along its first split tensor's dim; None where they are all equal or unknown."""
    for j, spec in enumerate(specs):
        first = per_chunk[0][j]
        if isinstance(first, torch.Tensor) and first.dim() > 0 and not (
                spec is _Replicate or isinstance(spec, _Replicate)):
            dim = spec.split_dim if isinstance(spec, TensorChunkSpec) else DEFAULT_CHUNK_DIM
            try:
                rows = [leaves[j].size(dim) for leaves in per_chunk]
            except IndexError:
                return None
            return rows if len(set(rows)) > 1 else None
    return None


def split_rows(args: tuple, kwargs: dict, args_chunk_spec: Any = None, kwargs_chunk_spec: Any = None) -> int:
    """The rows a batch is split by: the size of its first split tensor (positional before keyword)
    along the dimension it is split on; 0 where no tensor is split."""
    for tree, spec, name in ((tuple(args), args_chunk_spec, "args"), (dict(kwargs), kwargs_chunk_spec, "kwargs")):
        named, _, specs = _flatten_with_specs(tree, spec, name)
        for (_, value), leaf_spec in zip(named, specs):
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or leaf_spec is _Replicate \
                    or isinstance(leaf_spec, _Replicate):
                continue
            dim = leaf_spec.split_dim if isinstance(leaf_spec, TensorChunkSpec) else DEFAULT_CHUNK_DIM
            return value.size(dim) if -value.dim() <= dim < value.dim() else 0
    return 0


def check_rows_follow(batch_rows: int, target_rows: int, chunks: int, exact: bool = False) -> None:
    """ValueError unless the target holds a whole number k of rows per sample of the batch, so that each
    microbatch's target can hold the rows of its microbatch of the batch (`split_target_like` splits it
    so: k × each microbatch's batch rows). A target with one row per token of a row, flattened, passes;
    7 or 4 target rows for 8 samples would pair rows of different samples. 0 rows: unknown, passes.
    `exact` (a batch split along a dim other than 0, whose target is split along that dim or holds one
    row per sample): k must be 1, since a flattened target interleaves the samples of every microbatch."""
    if not batch_rows or not target_rows or batch_rows < chunks or target_rows < chunks:
        return
    if target_rows % batch_rows or (exact and target_rows != batch_rows):
        b, t = split_sizes(batch_rows, chunks), split_sizes(target_rows, chunks)
        raise ValueError(f"the target's {target_rows} rows do not follow the batch's {batch_rows} into {chunks} "
                         f"microbatches ({', '.join(map(str, t))} target rows against {', '.join(map(str, b))} "
                         f"batch rows): " + ("with the batch split along a dim other than 0 (args_chunk_spec), "
                                             "a target of 2 or more dims is cut along that dim too, so it must "
                                             "hold one row per sample there (laid out as the batch); a 1-dim "
                                             "target one row per sample"
                                             if exact else "each microbatch's target must hold the same whole "
                                             "number of rows for each of its samples"))


def split_target_like(target: Any, batch_rows: int, target_rows: int, chunks: int) -> list | None:
    """`target` split so that microbatch m holds k × b_m rows, where the batch's `batch_rows` split into
    b_m (`torch.tensor_split`) and the target holds k = target_rows / batch_rows rows per sample (a
    target flattened to one row per token): 10 samples of 8 tokens in 4 microbatches give 24, 24, 16,
    16 target rows, where splitting the 80 rows alone would give 20 each and pair rows of other
    samples. Each tensor leaf of `target` with `target_rows` rows is split so; other leaves as
    `split_args_kwargs_into_chunks` splits them. None where splitting the target alone already
    follows the batch (k = 1, or an even split)."""
    if not batch_rows or not target_rows or target_rows % batch_rows or batch_rows < chunks:
        return None
    k = target_rows // batch_rows
    sizes = [k * b for b in split_sizes(batch_rows, chunks)]
    if sizes == split_sizes(target_rows, chunks):
        return None
    leaves, spec = pytree.tree_flatten(target)
    alone = [pytree.tree_flatten(t)[0] for t in split_args_kwargs_into_chunks((target,), {}, chunks)[0]]
    parts = [leaf.split(sizes) if isinstance(leaf, torch.Tensor) and leaf.dim() and leaf.size(0) == target_rows
             else [alone[m][i] for m in range(chunks)] for i, leaf in enumerate(leaves)]
    return [pytree.tree_unflatten([p[m] for p in parts], spec) for m in range(chunks)]


def split_block_mask(mask: Any, chunks: int, path: str = "block_mask") -> list:
    """A flex-attention `BlockMask` split along its batch dimension as `torch.tensor_split` splits the
    batch (so each microbatch gets its own rows' blocks), each part's `mask_mod` reading batch index
    b + the part's first row. A mask of batch 1 broadcasts over the batch and is given to every
    microbatch whole. ValueError where the batch has fewer rows than `chunks`."""
    from torch.nn.attention.flex_attention import BlockMask

    rows = mask.kv_num_blocks.size(0)
    if rows == 1:
        return [mask] * chunks
    if rows < chunks:
        raise ValueError(f"batch of {rows} cannot be split into {chunks} microbatches ({path} is a BlockMask "
                         f"of batch {rows})")
    def offset_by(offset: int):   # exactly four parameters: flex attention reads mask_mod's signature
        def mask_mod(b, h, q_idx, kv_idx):
            return mask.mask_mod(b + offset, h, q_idx, kv_idx)
        return mask_mod

    parts, start = [], 0
    for n in split_sizes(rows, chunks):
        part = slice(start, start + n)
        parts.append(BlockMask.from_kv_blocks(
            mask.kv_num_blocks[part], mask.kv_indices[part],
            None if mask.full_kv_num_blocks is None else mask.full_kv_num_blocks[part],
            None if mask.full_kv_indices is None else mask.full_kv_indices[part],
            BLOCK_SIZE=mask.BLOCK_SIZE, mask_mod=offset_by(start), seq_lengths=mask.seq_lengths))
        start += n
    return parts


IGNORE_INDEX = -100   # the target class id cross-entropy skips by default (torch, Hugging Face)


_ABSENT = object()


def _stated(loss_fn: Any, key: str) -> Any:
    """What a loss function states for parameter `key`: the outermost `functools.partial` keyword that
    names it, else an attribute (an `nn.Module` loss's, or one set on a plain function), else the default
    of the function's parameter; `_ABSENT` where it states nothing."""
    while isinstance(loss_fn, functools.partial):
        if key in loss_fn.keywords:
            return loss_fn.keywords[key]
        loss_fn = loss_fn.func
    r = getattr(loss_fn, key, _ABSENT)
    if r is _ABSENT and callable(loss_fn):   # a function with that parameter: its default (F.mse_loss: "mean")
        try:
            param = inspect.signature(loss_fn).parameters.get(key)
        except (TypeError, ValueError):
            param = None
        if param is not None and param.default is not inspect.Parameter.empty:
            r = param.default
    return r


def loss_ignore_index(loss_fn: Any) -> int | None:
    """The target value a loss function skips (`ignore_index`), read as `loss_reduction` reads a reduction
    (an `nn.CrossEntropyLoss`'s attribute, a partial's keyword, a function's default, or an attribute set
    on a plain function); -100 (torch's and Hugging Face's) when it states none. None where it states
    `ignore_index = None`: nothing is ignored, or the loss is no token mean (a mean over rows of per-row
    means), so microbatches are weighted by rows."""
    r = _stated(loss_fn, "ignore_index")
    if r is None:
        return None
    return r if isinstance(r, int) and not isinstance(r, bool) else IGNORE_INDEX


def loss_reduction(loss_fn: Any) -> str | None:
    """The `reduction` a loss function states ("mean", "sum", ...): an `nn.Module` loss's attribute, or a
    `functools.partial`'s keyword (the outermost one that names it), or the default of a function's
    `reduction` parameter (`F.cross_entropy`); None when it states none (a plain function, which pp takes
    for a mean over rows)."""
    r = _stated(loss_fn, "reduction")
    return r if isinstance(r, str) else None


def loss_scales(targets: list | None, n_microbatches: int, reduction: str | None = None,
                dim: int = 0) -> float | list[float]:
    """The factor each microbatch's loss gradient is seeded with (a schedule's `scale_grads`).

    1 / n_microbatches when the microbatches are of one size, torch.distributed.pipelining's scaling.
    When the batch does not divide evenly (`torch.tensor_split`: 10 rows in 4 microbatches are 3, 3, 2,
    2), each microbatch's share of the batch's rows (0.3, 0.3, 0.2, 0.2): a loss that is a mean over
    rows (cross-entropy or MSE with reduction "mean" over rows of one length) then gets the gradient of
    the whole batch's mean, as the unsplit model does, not of the mean of unequal microbatch means.
    A loss that states `reduction="sum"` (see `loss_reduction`) keeps 1 / n_microbatches: the whole
    batch's summed gradient over n_microbatches, as torch gives for any split.
    `targets`: the microbatches' targets, split along `dim`; the rows are read from each one's first
    tensor (a 0-dim or missing tensor falls back to 1 / n_microbatches).
    """
    if reduction == "sum":
        return 1.0 / n_microbatches
    rows = []
    for t in targets or ():
        leaf = next((x for x in pytree.tree_leaves(t) if isinstance(x, torch.Tensor)), None)
        if leaf is None or leaf.dim() == 0:
            return 1.0 / n_microbatches
        rows.append(leaf.shape[dim] if -leaf.dim() <= dim < leaf.dim() else leaf.shape[0])
    if len(set(rows)) > 1:
        total = sum(rows)
        return [r / total for r in rows]
    return 1.0 / n_microbatches


def loss_class_weights(loss_fn: Any) -> torch.Tensor | None:
    """The per-class `weight` a class-weighted mean states: `nn.CrossEntropyLoss(weight=w)` or
    `nn.NLLLoss(weight=w)`, a `functools.partial` of `F.cross_entropy` / `F.nll_loss` with `weight=w`,
    or an attribute set on a plain function (`my_loss.weight = w`); its mean divides by the summed weights
    of the counted targets, not by their number. None otherwise (another module's `weight` is its own
    business: a learned parameter, not class weights)."""
    import torch.nn as nn
    import torch.nn.functional as F

    probe = loss_fn
    while isinstance(probe, functools.partial):
        probe = probe.func
    if isinstance(probe, nn.Module):
        known = isinstance(probe, (nn.CrossEntropyLoss, nn.NLLLoss))
    elif probe in (F.cross_entropy, F.nll_loss):
        known = isinstance(loss_fn, functools.partial)
    else:
        known = "weight" in getattr(probe, "__dict__", {})   # set on the function by its author
    w = _stated(loss_fn, "weight") if known else None
    return w if isinstance(w, torch.Tensor) and w.dim() == 1 else None


def is_class_ids(x: Any) -> bool:
    return (isinstance(x, torch.Tensor) and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool))


def class_id_tensors(target: Any) -> list[torch.Tensor]:
    """The integer tensors of a target (a tensor, or a tuple/dict holding some): candidates for the class
    ids a token mean counts. Bool masks and float weights are not."""
    return [x for x in pytree.tree_leaves(target) if is_class_ids(x)]


def target_counts(targets: list | None, ignore_index: int, device: torch.device | None = None,
                  weight: torch.Tensor | None = None, whole: Any = None) -> torch.Tensor | None:
    """How many targets each microbatch counts in a token mean: a float32 tensor (n_microbatches,) of the
    entries of each microbatch's class ids that are not `ignore_index` (with a class `weight` (C,), the sum
    of their classes' weights, the denominator of a weighted mean), on `device` (the targets' own where
    None); no host-device sync. The class ids are the target's one integer tensor (`class_id_tensors`);
    None where it has none or several (which one the loss reads cannot be told) or it has no row
    dimension. An `ignore_index` the dtype cannot hold (-100 in uint8) ignores nothing. `whole`: the
    batch's target the microbatches' were split from (dim 0); where they are equal blocks of it, all are
    counted in one pass over it rather than one per microbatch."""
    leaves = []
    for t in targets or ():
        ids = class_id_tensors(t)
        if len(ids) != 1 or ids[0].dim() == 0:
            return None
        leaves.append(ids[0])
    if not leaves:
        return None
    info = torch.iinfo(leaves[0].dtype)
    representable = info.min <= ignore_index <= info.max

    def counted(x: torch.Tensor) -> torch.Tensor:   # 1 per counted target, or its class's weight
        kept = x != ignore_index if representable else torch.ones_like(x, dtype=torch.bool)
        if weight is None:
            return kept
        w = weight.detach().float().to(x.device)
        return torch.where(kept, w[x.clamp(0, w.numel() - 1)], 0.0)

    first = class_id_tensors(whole)
    first = first[0] if len(first) == 1 else None
    n = len(leaves)
    if (first is not None and first.dtype == leaves[0].dtype and first.dim() == leaves[0].dim()
            and first.shape[0] == n * leaves[0].shape[0] and all(x.shape == leaves[0].shape for x in leaves)):
        counts = counted(first).reshape(n, -1).sum(1, dtype=torch.float32)   # equal row blocks: one pass
    else:
        counts = torch.stack([counted(x).sum(dtype=torch.float32) for x in leaves])
    return counts if device is None else counts.to(device, non_blocking=True)
