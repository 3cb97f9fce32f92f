"""The tensor-parallel graph rewrite: find planned linears, track which values are sharded, insert
the fewest collectives that keep every value that leaves the sharded region equal to the original.

A value is either replicated (the original tensor) or sharded along one dim (this rank's 1/size
block). Column-parallel linears shard their output's last dim; pointwise ops and shape-keeping views
carry a shard through; row-parallel linears consume it and reduce at once; anything else gathers.
Weights of planned modules are sharded by the caller; this module only rewrites the graph.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import fx

from pp.tp.emit import AutogradEmitter, FunctionalEmitter, new_node
from pp.tp.styles import LinearPlan

__all__ = ["PlannedParam", "find_planned_params", "rewrite_graph"]

_A = torch.ops.aten
_TRANSPOSES = (_A.t.default, _A.permute.default, _A.transpose.int)
_VIEWS = (_A.view.default, _A.reshape.default, _A._unsafe_view.default)
# Same-shape ops that carry no pointwise tag but act on each element independently.
_ELEMENTWISE = {_A.dropout.default, _A.clone.default, _A._to_copy.default, _A.alias.default,
                _A.detach.default, _A.contiguous.default, _A.to.dtype, _A.to.dtype_layout,
                _A.type_as.default, _A.native_dropout.default, _A.feature_dropout.default}
_TUPLE_ELEMENTWISE = {_A.native_dropout.default}


@dataclass(frozen=True)
class PlannedParam:
    """A parameter of a planned module: which module, which plan, "weight" or "bias"."""

    fqn: str
    plan: LinearPlan
    role: str


@dataclass
class _Linear:
    node: fx.Node
    fqn: str
    plan: LinearPlan
    form: str                 # "linear" (aten.linear), "addmm" or "mm" (weight through a transpose)
    bias: Optional[fx.Node]   # for "linear"/"addmm" only; a separate bias add is just a pointwise op

    @property
    def x(self) -> fx.Node:
        """The input as the node reads it now (earlier rewrites may have replaced it)."""
        return self.node.args[1 if self.form == "addmm" else 0]


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
    return found


def rewrite_graph(graph: fx.Graph, params: dict[fx.Node, PlannedParam],
                  emitter: FunctionalEmitter | AutogradEmitter) -> None:
    """Rewrite `graph` in place for tensor parallelism over `emitter`'s group."""
    _Rewrite(graph, params, emitter).run()


def _ndim(node: fx.Node) -> int:
    return node.meta["val"].dim()


def _is_tensor(a) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


class _Rewrite:
    def __init__(self, graph: fx.Graph, params: dict[fx.Node, PlannedParam],
                 emitter: FunctionalEmitter | AutogradEmitter) -> None:
        self.graph, self.params, self.emit = graph, params, emitter
        self.size = emitter.size
        self.place: dict[fx.Node, int] = {}     # node -> sharded dim; absent means replicated
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

    def _find_linears(self) -> dict[fx.Node, _Linear]:
        linears: dict[fx.Node, _Linear] = {}
        for w, p in self.params.items():
            if p.role != "weight":
                continue
            for user in list(w.users):
                if user.target is _A.linear.default and user.args[1] is w and user.args[0] is not w:
                    bias = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
                    linears[user] = _Linear(user, p.fqn, p.plan, "linear", bias)
                elif user.target in _TRANSPOSES and _is_2d_transpose(user):
                    for mm in user.users:
                        lin = _mm_linear(mm, user, p)
                        if lin is None:
                            _unsupported_use(p.fqn, mm)
                        linears[mm] = lin
                else:
                    _unsupported_use(p.fqn, user)
        return linears

    # -- rewriting ----------------------------------------------------------------------------

    def _rewrite_linear(self, lin: _Linear) -> None:
        node, x = lin.node, lin.x
        with self.graph.inserting_before(node):
            if lin.plan.kind == "col":
                x_full = self._replicated(x)
                x_in = self._cached("copy_to", x_full, lambda: self.emit.copy_to(self.graph, x_full))
                node.replace_input_with(x, x_in)
                self.place[node] = _ndim(node) - 1
                if lin.plan.out_dim is None:
                    self._replace_after(node, lambda: self._gather(node))
                return
            last = _ndim(x) - 1
            if self.place.get(x) != last:
                x_full = self._replicated(x)
                x_local = self._cached("slice", x_full, lambda: self.emit.slice(self.graph, x_full, last))
                node.replace_input_with(x, x_local)
        bias = lin.bias
        if lin.form == "linear" and bias is not None:
            node.args = node.args[:2]
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "bias"}
        elif lin.form == "addmm":
            node.target = _A.mm.default
            node.args = node.args[1:3]
        node = _through_views(node)  # mm on flattened rows: reduce the module's (unflattened) output
        out_dim = lin.plan.out_dim
        if out_dim is not None:
            out_dim %= _ndim(node)
            if out_dim == _ndim(node) - 1:
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
                out = new_node(self.graph, _A.add.Tensor, (out, bias), node)
            return out

        reduced = self._replace_after(node, reduce)
        if out_dim is not None:
            self.place[reduced] = out_dim

    def _propagate(self, node: fx.Node) -> None:
        """Carry a shard through `node` where that is exact; otherwise gather its sharded inputs."""
        tensors = [a for a in node.all_input_nodes if _is_tensor(a)]
        if not any(a in self.place for a in tensors):
            return
        if node.target is _A.sym_size.int and self.place.get(node.args[0]) != node.args[1] % _ndim(node.args[0]):
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
            return self.place.get(src) if src.target in _TUPLE_ELEMENTWISE else None
        if not isinstance(target, torch._ops.OpOverload):
            return None
        if target in _TRANSPOSES:
            return _transposed_dim(node, self.place[node.args[0]]) if node.args[0] in self.place else None
        if target in _VIEWS:
            return self._view_dim(node)
        val = node.meta.get("val")
        if target in _TUPLE_ELEMENTWISE:
            val = val[0] if isinstance(val, (tuple, list)) else None
        if not isinstance(val, torch.Tensor):
            return None
        if target in _ELEMENTWISE or torch.Tag.pointwise in target.tags:
            return _broadcast_dim(val, tensors, self.place)
        return None

    def _view_dim(self, node: fx.Node) -> Optional[int]:
        """A view that keeps the sharded last dim whole and last keeps the shard (local size in
        the shape argument); any other view needs the full tensor."""
        src, shape = node.args[0], node.args[1]
        if src not in self.place or self.place[src] != _ndim(src) - 1:
            return None
        full = src.meta["val"].shape[-1]
        out = node.meta["val"].shape
        if len(out) == 0 or out[-1] != full or not isinstance(shape, (list, tuple)) or not shape:
            return None
        if shape[-1] == full:
            node.args = (src, [*shape[:-1], full // self.size], *node.args[2:])
        elif shape[-1] != -1:
            return None
        return len(out) - 1

    # -- helpers ------------------------------------------------------------------------------

    def _replicated(self, x: fx.Node) -> fx.Node:
        return self._gather(x) if x in self.place else x

    def _gather(self, x: fx.Node) -> fx.Node:
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


def _through_views(node: fx.Node) -> fx.Node:
    """The last of a chain of single-user views after `node` that keep its last dim (a partial
    sum stays a partial sum through them); `node` itself if there are none."""
    while len(node.users) == 1:
        view = next(iter(node.users))
        if view.target not in _VIEWS or view.args[0] is not node:
            break
        if view.meta["val"].shape[-1] != node.meta["val"].shape[-1]:
            break
        node = view
    return node


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.target is _A.t.default:
        return True
    if node.target is _A.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    return {d % 2 for d in node.args[1:3]} == {0, 1}


def _transposed_dim(node: fx.Node, dim: int) -> int:
    nd = node.args[0].meta["val"].dim()
    if node.target is _A.t.default:
        return 1 - dim if nd == 2 else dim
    if node.target is _A.permute.default:
        return [d % nd for d in node.args[1]].index(dim)
    a, b = (d % nd for d in node.args[1:3])
    return b if dim == a else a if dim == b else dim


def _mm_linear(mm: fx.Node, wt: fx.Node, p: PlannedParam) -> Optional[_Linear]:
    """An addmm(bias, x, wᵀ) or mm(x, wᵀ) that computes the planned linear, else None."""
    if mm.target is _A.addmm.default and mm.args[2] is wt and mm.args[1] is not wt:
        if any(mm.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return None
        return _Linear(mm, p.fqn, p.plan, "addmm", mm.args[0])
    if mm.target is _A.mm.default and mm.args[1] is wt and mm.args[0] is not wt:
        return _Linear(mm, p.fqn, p.plan, "mm", None)
    return None


def _unsupported_use(fqn: str, user: fx.Node) -> None:
    raise ValueError(f"{fqn}: its weight is used by {user.target} (node {user.name}); only "
                     f"nn.Linear uses (aten.linear, or t/permute + mm/addmm) can be sharded")


def _broadcast_dim(out: torch.Tensor, tensors: list[fx.Node], place: dict) -> Optional[int]:
    """The output dim all sharded inputs agree on under broadcasting, if replicated inputs are
    size 1 (or absent) there; None if they disagree."""
    dim: Optional[int] = None
    for a in tensors:
        shape = a.meta["val"].shape
        offset = out.dim() - len(shape)
        if a in place:
            d = place[a] + offset
            if (dim is not None and d != dim) or shape[place[a]] != out.shape[d]:
                return None
            dim = d
    for a in tensors:
        if a not in place:
            shape = a.meta["val"].shape
            i = dim - (out.dim() - len(shape))
            if i >= 0 and shape[i] != 1:
                return None
    return dim
