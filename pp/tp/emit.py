"""Graph-node emitters for the collectives the TP rewrite inserts.

`FunctionalEmitter` writes `_c10d_functional` ops + `wait_tensor` (what an ExportedProgram may hold;
not differentiable). `AutogradEmitter` writes calls to `pp.tp.regions` (differentiable, for stage
modules that train). Both insert at the graph's current insertion point and give every new node the
*logical* (unsharded) `meta["val"]` of the value it stands for, which the rewrite's rules read.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from pp.tp import regions
from pp.tp.layout import chunk_bounds

__all__ = ["AutogradEmitter", "FunctionalEmitter"]

_F = torch.ops._c10d_functional
_A = torch.ops.aten


def new_node(graph: fx.Graph, target: Any, args: tuple, like: fx.Node, val: Any = None) -> fx.Node:
    """Insert `target(*args)`; copy `like`'s logical value and module stack into the new node's meta."""
    node = graph.call_function(target, args)
    node.meta["val"] = like.meta.get("val") if val is None else val
    for key in ("nn_module_stack", "stack_trace"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def _dense(graph: fx.Graph, x: fx.Node) -> fx.Node:
    """`x`, or a contiguous copy where its (logical) value is strided: collectives need dense input."""
    if x.meta["val"].is_contiguous():
        return x
    dense = new_node(graph, _A.clone.default, (x,), x)
    dense.kwargs = {"memory_format": torch.contiguous_format}
    return dense


def _uneven_step(n: Any, size: int) -> int | None:
    """The padded part size where `n` (a static size) does not split evenly over `size` ranks."""
    return -(-n // size) if isinstance(n, int) and n % size else None


class _Emitter:
    def __init__(self, name: str, size: int, rank: int) -> None:
        self.name, self.size, self.rank = name, size, rank


class FunctionalEmitter(_Emitter):
    """Emit `torch.ops._c10d_functional.*` + `wait_tensor` nodes (forward only)."""

    def copy_to(self, graph: fx.Graph, x: fx.Node) -> fx.Node:
        return x

    def all_reduce(self, graph: fx.Graph, x: fx.Node) -> fx.Node:
        ar = new_node(graph, _F.all_reduce.default, (x, "sum", self.name), x)
        return new_node(graph, _F.wait_tensor.default, (ar,), x)

    def gather(self, graph: fx.Graph, x: fx.Node, dim: int) -> fx.Node:
        """All-gather local shards of `x` along `dim` (all_gather_into_tensor stacks on dim 0,
        so for another dim: view as (size, *local), move that axis next to `dim`, merge). Uneven
        shards (`chunk_bounds`) are padded to the largest first and the padding is sliced off."""
        full = x.meta["val"]
        n = full.shape[dim]
        step = _uneven_step(n, self.size)
        src = x
        if step is not None:
            start, stop = chunk_bounds(n, self.size, self.rank)
            if stop - start < step:
                pad = [0, 0] * (full.dim() - 1 - dim) + [0, step - (stop - start)]
                src = new_node(graph, _A.constant_pad_nd.default, (x, pad, 0.0), x)
        ag = new_node(graph, _F.all_gather_into_tensor.default, (_dense(graph, src), self.size, self.name), x)
        out = new_node(graph, _F.wait_tensor.default, (ag,), x)
        if dim != 0:
            local = self._sizes(graph, x, dim, step if step is not None else n // self.size)
            stacked = new_node(graph, _A.view.default, (out, [self.size, *local]), x)
            perm = list(range(1, full.dim() + 1))
            perm.insert(dim, 0)
            moved = new_node(graph, _A.permute.default, (stacked, perm), x)
            dense = new_node(graph, _A.clone.default, (moved,), x)
            dense.kwargs = {"memory_format": torch.contiguous_format}
            gathered = self._sizes(graph, x, dim, n if step is None else step * self.size)
            out = new_node(graph, _A.view.default, (dense, gathered), x)
        if step is not None:
            out = new_node(graph, _A.slice.Tensor, (out, dim, 0, n), x)
        return out

    def reduce_scatter(self, graph: fx.Graph, x: fx.Node, dim: int) -> fx.Node:
        """Reduce-scatter `x` along `dim` (the op scatters dim 0: bring chunk index to the front)."""
        src = _dense(graph, x)
        if dim != 0:
            full = x.meta["val"]
            sizes = self._sizes(graph, x, None)
            split = sizes[:dim] + [self.size, full.shape[dim] // self.size] + sizes[dim + 1:]
            chunked = new_node(graph, _A.view.default, (src, split), x)
            perm = list(range(full.dim() + 1))
            perm.insert(0, perm.pop(dim))
            moved = new_node(graph, _A.permute.default, (chunked, perm), x)
            src = new_node(graph, _A.clone.default, (moved,), x)
            src.kwargs = {"memory_format": torch.contiguous_format}
            stacked = sizes[:dim] + [full.shape[dim] // self.size] + sizes[dim + 1:]
            stacked[0] = self.size * stacked[0] if isinstance(stacked[0], int) else -1
            src = new_node(graph, _A.view.default, (src, stacked), x)
        rs = new_node(graph, _F.reduce_scatter_tensor.default, (src, "sum", self.size, self.name), x)
        return new_node(graph, _F.wait_tensor.default, (rs,), x)

    def slice(self, graph: fx.Graph, x: fx.Node, dim: int) -> fx.Node:
        n = x.meta["val"].shape[dim]
        start, stop = chunk_bounds(n, self.size, self.rank) if _uneven_step(n, self.size) else (
            self.rank * (n // self.size), (self.rank + 1) * (n // self.size))
        return new_node(graph, _A.slice.Tensor, (x, dim, start, stop), x)

    def _sizes(self, graph: fx.Graph, x: fx.Node, dim: Any, length: Any = None) -> list:
        """Shape of `x`'s value as graph arguments: ints, or `sym_size` nodes where symbolic; dim
        `dim` (if any) gets `length`."""
        out: list = []
        for i, s in enumerate(x.meta["val"].shape):
            if i == dim:
                out.append(length)
            elif isinstance(s, int):
                out.append(s)
            else:
                out.append(new_node(graph, _A.sym_size.int, (x, i), x, val=s))
        return out


class AutogradEmitter(_Emitter):
    """Emit calls to the differentiable `pp.tp.regions` functions."""

    def copy_to(self, graph: fx.Graph, x: fx.Node) -> fx.Node:
        return new_node(graph, regions.copy_to_tp, (x, self.name), x)

    def all_reduce(self, graph: fx.Graph, x: fx.Node) -> fx.Node:
        return new_node(graph, regions.reduce_from_tp, (x, self.name), x)

    def gather(self, graph: fx.Graph, x: fx.Node, dim: int) -> fx.Node:
        n = x.meta["val"].shape[dim]
        length = n if _uneven_step(n, self.size) else None
        return new_node(graph, regions.gather_from_tp, (x, dim, self.size, self.rank, self.name, length), x)

    def reduce_scatter(self, graph: fx.Graph, x: fx.Node, dim: int) -> fx.Node:
        return new_node(graph, regions.reduce_scatter_to_tp, (x, dim, self.size, self.name), x)

    def slice(self, graph: fx.Graph, x: fx.Node, dim: int) -> fx.Node:
        return new_node(graph, regions.slice_to_tp, (x, dim, self.size, self.rank, self.name), x)
