"""The tensor-parallel graph rewrite: find planned linears, track which values are sharded, insert
the fewest collectives that keep every value that leaves the sharded region equal to the original.

A value is either replicated (the original tensor) or sharded along one dim (this rank's part, cut
as `torch.chunk` and DTensor cut it: uneven where the size does not divide, see `chunk_bounds`).
Column-parallel linears shard their output's last dim; pointwise ops, views that keep the sharded
block contiguous (e.g. (b, t, c) -> (b, t, heads, head_dim): local heads), transposes, splits and
attention over sharded heads carry a shard through; row-parallel linears consume it and reduce at
once; anything else gathers. A fused projection whose output is split into k equal parts (qkv) is
sharded in k blocks, so that every part is sharded alike. Weights of planned modules are sharded by
the caller (`PlannedParam.blocks` says how); this module only rewrites the graph.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Optional

import torch
from torch import fx

from pp.tp.emit import AutogradEmitter, FunctionalEmitter, new_node
from pp.tp.patterns import (ATEN, ATTENTION, ELEMENTWISE, SPLITS, TRANSPOSES, TUPLE_ELEMENTWISE, VIEWS,
                            PlannedParam, LinearUse, broadcast_dim, fused_blocks, is_2d_transpose, ndim,
                            mm_linear, static_numel, through_views, transposed_dim, unsupported_use)
from pp.tp.styles import LinearPlan

__all__ = ["PlannedParam", "find_planned_params", "rewrite_graph"]

def find_planned_params(graph: fx.Graph, param_fqn: Callable[[fx.Node], Optional[str]],
                        plans: dict[str, LinearPlan], require_all: bool = True) -> dict[fx.Node, PlannedParam]:
    """Map the graph's weight/bias nodes of every planned module.

    Fails if a plan names a module without a 2-D weight here (with `require_all=False`, as for one
    pipeline stage of a whole-model plan, only if no planned module is here at all).
    """
    found: dict[fx.Node, PlannedParam] = {}
    for node in graph.nodes:
        name = param_fqn(node)
        if name is None:
            continue
        module, _, leaf = name.rpartition(".")
        if module in plans and leaf in ("weight", "bias"):
            found[node] = PlannedParam(module, plans[module], leaf)
            shape = tuple(node.meta["val"].shape)
            if leaf == "weight" and len(shape) != 2:
                raise ValueError(f"{module}: weight has shape {shape}; tensor parallelism needs a 2-D "
                                 f"nn.Linear weight")
    present = {p.fqn for p in found.values() if p.role == "weight"}
    missing = sorted(set(plans) - present)
    if missing and (require_all or not present):
        raise ValueError(f"parallel_strategies names module(s) {missing} that have no 'weight' "
                         f"parameter in the program; expected names of nn.Linear modules")
    blocks = {p.fqn: fused_blocks(node) for node, p in found.items()
              if p.role == "weight" and p.plan.kind == "col" and p.plan.out_dim is not None}
    return {node: dataclasses.replace(p, blocks=blocks.get(p.fqn, 1)) for node, p in found.items()}


def rewrite_graph(graph: fx.Graph, params: dict[fx.Node, PlannedParam],
                  emitter: FunctionalEmitter | AutogradEmitter) -> None:
    """Rewrite `graph` in place for tensor parallelism over `emitter`'s group."""
    _Rewrite(graph, params, emitter).run()


def _is_tensor(a) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


class _Rewrite:
    def __init__(self, graph: fx.Graph, params: dict[fx.Node, PlannedParam],
                 emitter: FunctionalEmitter | AutogradEmitter) -> None:
        self.graph, self.params, self.emit = graph, params, emitter
        self.size = emitter.size
        self.place: dict[fx.Node, int] = {}     # node -> sharded dim; absent means replicated
        self.blocks: dict[fx.Node, int] = {}    # node -> k where sharded in k blocks (fused qkv output)
        self.cache: dict[tuple, fx.Node] = {}   # (kind, node) -> inserted node, to share collectives

    def run(self) -> None:
        linears = self._find_linears()
        for node, p in self.params.items():
            if p.role == "weight":
                self.place[node] = 0 if p.plan.kind == "col" else 1
            elif p.plan.kind == "col":
                self.place[node] = 0
        for node in list(self.graph.nodes):
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                self._gather_args(node)
            elif node in linears:
                self._rewrite_linear(linears[node])
            else:
                self._propagate(node)

    # -- finding the linears -------------------------------------------------------------------

    def _find_linears(self) -> dict[fx.Node, LinearUse]:
        linears: dict[fx.Node, LinearUse] = {}
        for w, p in self.params.items():
            if p.role != "weight":
                continue
            for user in list(w.users):
                if user.target is ATEN.linear.default and user.args[1] is w and user.args[0] is not w:
                    bias = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
                    linears[user] = LinearUse(user, p.fqn, p.plan, "linear", bias, p.blocks)
                elif user.target in TRANSPOSES and is_2d_transpose(user):
                    for mm in user.users:
                        lin = mm_linear(mm, user, p)
                        if lin is None:
                            unsupported_use(p.fqn, mm)
                        linears[mm] = lin
                else:
                    unsupported_use(p.fqn, user)
        return linears

    # -- rewriting ----------------------------------------------------------------------------

    def _rewrite_linear(self, lin: LinearUse) -> None:
        node, x = lin.node, lin.x
        with self.graph.inserting_before(node):
            if lin.plan.kind == "col":
                x_full = self._replicated(x)
                x_in = self._cached("copy_to", x_full, lambda: self.emit.copy_to(self.graph, x_full))
                node.replace_input_with(x, x_in)
                self.place[node] = ndim(node) - 1
                if lin.blocks > 1:
                    self.blocks[node] = lin.blocks
                if lin.plan.out_dim is None:
                    self._replace_after(node, lambda: self._gather(node))
                return
            last = ndim(x) - 1
            if self.place.get(x) != last:
                x_full = self._replicated(x)
                x_local = self._cached("slice", x_full, lambda: self.emit.slice(self.graph, x_full, last))
                node.replace_input_with(x, x_local)
        bias = lin.bias
        if lin.form == "linear" and bias is not None:
            node.args = node.args[:2]
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
        elif lin.form == "addmm":
            node.target = ATEN.mm.default
            node.args = node.args[1:3]
        node = through_views(node)  # mm on flattened rows: reduce the module's (unflattened) output
        out_dim = lin.plan.out_dim
        if out_dim is not None:
            out_dim %= ndim(node)
            if out_dim == ndim(node) - 1:
                raise ValueError(f"{lin.fqn}: RowwiseParallel can scatter its output along any dim "
                                 f"but the last (features); got dim {lin.plan.out_dim}")
            if node.meta["val"].shape[out_dim] % self.size != 0:
                raise ValueError(f"{lin.fqn}: output dim {out_dim} of size "
                                 f"{node.meta['val'].shape[out_dim]} does not divide by world_size {self.size}")

        def reduce() -> fx.Node:
            if out_dim is None:
                out = self.emit.all_reduce(self.graph, node)
            else:
                out = self.emit.reduce_scatter(self.graph, node, out_dim)
            if bias is not None:
                out = new_node(self.graph, ATEN.add.Tensor, (out, bias), node)
            return out

        reduced = self._replace_after(node, reduce)
        if out_dim is not None:
            self.place[reduced] = out_dim

    def _propagate(self, node: fx.Node) -> None:
        """Carry a shard through `node` where that is exact; otherwise gather its sharded inputs."""
        if not any(a in self.place for a in node.all_input_nodes):
            return
        tensors = [a for a in node.all_input_nodes if _is_tensor(a)]
        if node.target is ATEN.sym_size.int and self.place.get(node.args[0]) != node.args[1] % ndim(node.args[0]):
            return  # the size of a dim that is not sharded: the local tensor has it too
        dim = self._carried_dim(node, tensors)
        if dim is not None:
            self.place[node] = dim
        else:
            self._gather_args(node)

    def _carried_dim(self, node: fx.Node, tensors: list[fx.Node]) -> Optional[int]:
        target = node.target
        if target is operator.getitem:
            src = node.args[0]
            return self.place.get(src) if src.target in TUPLE_ELEMENTWISE or src.target in SPLITS else None
        if not isinstance(target, torch._ops.OpOverload):
            return None
        if target in VIEWS:
            return self._view_dim(node)
        if target in SPLITS:
            return self._split_dim(node)
        if any(a in self.blocks for a in tensors):
            return None  # fused_blocks lets only views and the split see a blocked value
        if target in ATTENTION:
            return self._attention_dim(node)
        if target in TRANSPOSES:
            return transposed_dim(node, self.place[node.args[0]]) if node.args[0] in self.place else None
        val = node.meta.get("val")
        if target in TUPLE_ELEMENTWISE:
            val = val[0] if isinstance(val, (tuple, list)) else None
        if not isinstance(val, torch.Tensor):
            return None
        if target in ELEMENTWISE or torch.Tag.pointwise in target.tags:
            return broadcast_dim(val, tensors, self.place)
        return None

    def _view_dim(self, node: fx.Node) -> Optional[int]:
        """A view keeps the shard of dim d if some output dim c starts the same contiguous blocks
        (equal static sizes of dims d.. and c..) and divides by the group: splitting features into
        (heads, head_dim) shards heads, merging them back shards features. The shape argument gets
        the local size of c. A blocked value only passes views that keep its last dim whole."""
        src, shape = node.args[0], node.args[1]
        if src not in self.place or not isinstance(shape, (list, tuple)) or len(shape) != ndim(node):
            return None
        d, full, out = self.place[src], src.meta["val"].shape, node.meta["val"].shape
        if isinstance(full[d], int) and full[d] % self.size:
            return None  # uneven parts (chunk_bounds) are not a block of any other dim: gather
        inner = static_numel(full[d:])
        for c in range(len(out)):
            if inner is None or static_numel(out[c:]) != inner or out[c] % self.size:
                continue
            if src in self.blocks:
                if c != len(out) - 1 or out[c] != full[d]:
                    return None
                self.blocks[node] = self.blocks[src]
            if shape[c] == -1:
                return c
            if not isinstance(shape[c], int):
                return None
            node.args = (src, [*shape[:c], shape[c] // self.size, *shape[c + 1:]], *node.args[2:])
            return c
        return None

    def _split_dim(self, node: fx.Node) -> Optional[int]:
        """Pieces along an unsharded dim keep the shard; a blocked value split into its k blocks
        along the sharded dim gives k pieces sharded alike (local sizes in the split argument)."""
        src = node.args[0]
        if src not in self.place or not all(isinstance(a, (int, list, tuple)) for a in node.args[1:]):
            return None
        d, n = self.place[src], ndim(src)
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % n
        k = self.blocks.get(src, 1)
        if dim != d:
            return None if k > 1 else d
        sizes = [v.shape[dim] for v in node.meta["val"]]
        if k == 1 or len(sizes) != k or len(set(sizes)) != 1 or sizes[0] % self.size:
            return None
        local = sizes[0] // self.size
        node.args = (src, local if node.target is ATEN.split.Tensor else [local] * k, dim)
        node.kwargs = {}
        return d

    def _attention_dim(self, node: fx.Node) -> Optional[int]:
        """Attention with q, k, v sharded on the same leading dim (heads) is local to each shard."""
        q, k, v = node.args[:3]
        d = self.place.get(q)
        if d is None or d >= ndim(q) - 2 or self.place.get(k) != d or self.place.get(v) != d:
            return None
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            shape = mask.meta["val"].shape
            i = d - (ndim(q) - len(shape))
            if mask in self.place or (i >= 0 and shape[i] != 1):
                return None
        return d

    # -- helpers ------------------------------------------------------------------------------

    def _replicated(self, x: fx.Node) -> fx.Node:
        return self._gather(x) if x in self.place else x

    def _gather(self, x: fx.Node) -> fx.Node:
        if x in self.blocks:  # fused_blocks lets only views and the split see a blocked value
            raise AssertionError(f"pp.tp: {x.name} is sharded in blocks and cannot be gathered")

        def make() -> fx.Node:
            with self._inserting_after(x):
                return self.emit.gather(self.graph, x, self.place[x])
        return self._cached("gather", x, make)

    def _gather_args(self, node: fx.Node) -> None:
        for a in list(node.all_input_nodes):
            if a in self.place:
                node.replace_input_with(a, self._gather(a))

    def _cached(self, kind: str, x: fx.Node, make: Callable[[], fx.Node]) -> fx.Node:
        if (kind, x) not in self.cache:
            self.cache[(kind, x)] = make()
        return self.cache[(kind, x)]

    def _inserting_after(self, x: fx.Node):
        """Right after `x`, or after the last input if `x` is one (inputs stay first)."""
        if x.op in ("placeholder", "get_attr"):
            first = next(n for n in self.graph.nodes if n.op not in ("placeholder", "get_attr"))
            return self.graph.inserting_before(first)
        return self.graph.inserting_before(x.next)  # keeps several new nodes in order

    def _replace_after(self, node: fx.Node, make: Callable[[], fx.Node]) -> fx.Node:
        """Insert `make()` right after `node` and point all of `node`'s old users at its result."""
        users = list(node.users)
        with self.graph.inserting_before(node.next):
            new = make()
        for u in users:
            u.replace_input_with(node, new)
        return new
