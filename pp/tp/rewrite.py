"""The tensor-parallel graph rewrite: find planned linears, track which values are sharded, insert
the fewest collectives that keep every value that leaves the sharded region equal to the original.

A value is either replicated (the original tensor) or sharded along one dim (this rank's 1/size
block). Column-parallel linears shard their output's last dim; pointwise ops, views that keep the
sharded block contiguous (e.g. (b, t, c) -> (b, t, heads, head_dim): local heads), transposes, splits
and attention over sharded heads carry a shard through; row-parallel linears consume it and reduce at
once; anything else gathers. A fused projection whose output is split into k equal parts (qkv) is
sharded in k blocks, so that every part is sharded alike. Weights of planned modules are sharded by
the caller (`PlannedParam.blocks` says how); this module only rewrites the graph.
"""
from __future__ import annotations

import dataclasses
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
_SPLITS = (_A.split.Tensor, _A.split_with_sizes.default)
_ATTENTION = (_A.scaled_dot_product_attention.default,)
# Same-shape ops that carry no pointwise tag but act on each element independently.
_ELEMENTWISE = {_A.dropout.default, _A.clone.default, _A._to_copy.default, _A.alias.default,
                _A.detach.default, _A.contiguous.default, _A.to.dtype, _A.to.dtype_layout,
                _A.type_as.default, _A.native_dropout.default, _A.feature_dropout.default}
_TUPLE_ELEMENTWISE = {_A.native_dropout.default}


@dataclass(frozen=True)
class PlannedParam:
    """A parameter of a planned module: which module, which plan, "weight" or "bias", and in how
    many equal blocks a column-parallel one is sharded (3 for a fused qkv whose output is split)."""

    fqn: str
    plan: LinearPlan
    role: str
    blocks: int = 1


@dataclass
class _Linear:
    node: fx.Node
    fqn: str
    plan: LinearPlan
    form: str                 # "linear" (aten.linear), "addmm" or "mm" (weight through a transpose)
    bias: Optional[fx.Node]   # for "linear"/"addmm" only; a separate bias add is just a pointwise op
    blocks: int = 1

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
    blocks = {p.fqn: _fused_blocks(node) for node, p in found.items()
              if p.role == "weight" and p.plan.kind == "col" and p.plan.out_dim is not None}
    return {node: dataclasses.replace(p, blocks=blocks.get(p.fqn, 1)) for node, p in found.items()}


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

    def _find_linears(self) -> dict[fx.Node, _Linear]:
        linears: dict[fx.Node, _Linear] = {}
        for w, p in self.params.items():
            if p.role != "weight":
                continue
            for user in list(w.users):
                if user.target is _A.linear.default and user.args[1] is w and user.args[0] is not w:
                    bias = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
                    linears[user] = _Linear(user, p.fqn, p.plan, "linear", bias, p.blocks)
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
                if lin.blocks > 1:
                    self.blocks[node] = lin.blocks
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
        if not any(a in self.place for a in node.all_input_nodes):
            return
        tensors = [a for a in node.all_input_nodes if _is_tensor(a)]
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
            return self.place.get(src) if src.target in _TUPLE_ELEMENTWISE or src.target in _SPLITS else None
        if not isinstance(target, torch._ops.OpOverload):
            return None
        if target in _VIEWS:
            return self._view_dim(node)
        if target in _SPLITS:
            return self._split_dim(node)
        if any(a in self.blocks for a in tensors):
            return None  # _fused_blocks lets only views and the split see a blocked value
        if target in _ATTENTION:
            return self._attention_dim(node)
        if target in _TRANSPOSES:
            return _transposed_dim(node, self.place[node.args[0]]) if node.args[0] in self.place else None
        val = node.meta.get("val")
        if target in _TUPLE_ELEMENTWISE:
            val = val[0] if isinstance(val, (tuple, list)) else None
        if not isinstance(val, torch.Tensor):
            return None
        if target in _ELEMENTWISE or torch.Tag.pointwise in target.tags:
            return _broadcast_dim(val, tensors, self.place)
        return None

    def _view_dim(self, node: fx.Node) -> Optional[int]:
        """A view keeps the shard of dim d if some output dim c starts the same contiguous blocks
        (equal static sizes of dims d.. and c..) and divides by the group: splitting features into
        (heads, head_dim) shards heads, merging them back shards features. The shape argument gets
        the local size of c. A blocked value only passes views that keep its last dim whole."""
        src, shape = node.args[0], node.args[1]
        if src not in self.place or not isinstance(shape, (list, tuple)) or len(shape) != _ndim(node):
            return None
        d, full, out = self.place[src], src.meta["val"].shape, node.meta["val"].shape
        inner = _static_numel(full[d:])
        for c in range(len(out)):
            if inner is None or _static_numel(out[c:]) != inner or out[c] % self.size:
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
        d, n = self.place[src], _ndim(src)
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % n
        k = self.blocks.get(src, 1)
        if dim != d:
            return None if k > 1 else d
        sizes = [v.shape[dim] for v in node.meta["val"]]
        if k == 1 or len(sizes) != k or len(set(sizes)) != 1 or sizes[0] % self.size:
            return None
        local = sizes[0] // self.size
        node.args = (src, local if node.target is _A.split.Tensor else [local] * k, dim)
        node.kwargs = {}
        return d

    def _attention_dim(self, node: fx.Node) -> Optional[int]:
        """Attention with q, k, v sharded on the same leading dim (heads) is local to each shard."""
        q, k, v = node.args[:3]
        d = self.place.get(q)
        if d is None or d >= _ndim(q) - 2 or self.place.get(k) != d or self.place.get(v) != d:
            return None
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            shape = mask.meta["val"].shape
            i = d - (_ndim(q) - len(shape))
            if mask in self.place or (i >= 0 and shape[i] != 1):
                return None
        return d

    # -- helpers ------------------------------------------------------------------------------

    def _replicated(self, x: fx.Node) -> fx.Node:
        return self._gather(x) if x in self.place else x

    def _gather(self, x: fx.Node) -> fx.Node:
        if x in self.blocks:  # _fused_blocks lets only views and the split see a blocked value
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


def _static_numel(shape) -> Optional[int]:
    """The product of `shape`, or None if a size in it is symbolic."""
    n = 1
    for s in shape:
        if not isinstance(s, int):
            return None
        n *= s
    return n


def _fused_blocks(w: fx.Node) -> int:
    """k if every linear of column-parallel weight `w` feeds, through views keeping its last dim,
    only one split of that dim into k > 1 equal parts (a fused qkv projection); else 1."""
    ks = set()
    for user in w.users:
        outs = list(user.users) if user.target in _TRANSPOSES else [user]
        for out in outs:
            while len(out.users) == 1 and next(iter(out.users)).target in _VIEWS:
                view = next(iter(out.users))
                if view.meta["val"].shape[-1] != out.meta["val"].shape[-1]:
                    break
                out = view
            split = next(iter(out.users)) if len(out.users) == 1 else None
            if split is None or split.target not in _SPLITS or split.args[0] is not out:
                return 1
            dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
            sizes = [v.shape[dim] for v in split.meta["val"]]
            if dim % _ndim(out) != _ndim(out) - 1 or len(sizes) < 2 or len(set(sizes)) != 1:
                return 1
            ks.add(len(sizes))
    return ks.pop() if len(ks) == 1 else 1


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
        return _Linear(mm, p.fqn, p.plan, "addmm", mm.args[0], p.blocks)
    if mm.target is _A.mm.default and mm.args[1] is wt and mm.args[0] is not wt:
        return _Linear(mm, p.fqn, p.plan, "mm", None, p.blocks)
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
