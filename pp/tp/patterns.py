"""What the tensor-parallel rewrite recognises in an exported graph: the aten ops that carry a shard
(views, transposes, splits, attention, elementwise ops), linears in their three exported forms, fused
projections, and broadcasts; and the records it keeps for them (`PlannedParam`, `LinearUse`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from pp.tp.styles import LinearPlan

ATEN = torch.ops.aten
TRANSPOSES = (ATEN.t.default, ATEN.permute.default, ATEN.transpose.int)
VIEWS = (ATEN.view.default, ATEN.reshape.default, ATEN._unsafe_view.default)
SPLITS = (ATEN.split.Tensor, ATEN.split_with_sizes.default)
ATTENTION = (ATEN.scaled_dot_product_attention.default,)
# Same-shape ops that carry no pointwise tag but act on each element independently.
ELEMENTWISE = {ATEN.dropout.default, ATEN.clone.default, ATEN._to_copy.default, ATEN.alias.default,
                ATEN.detach.default, ATEN.contiguous.default, ATEN.to.dtype, ATEN.to.dtype_layout,
                ATEN.type_as.default, ATEN.native_dropout.default, ATEN.feature_dropout.default}
TUPLE_ELEMENTWISE = {ATEN.native_dropout.default}


@dataclass(frozen=True)
class PlannedParam:
    """A parameter of a planned module: which module, which plan, "weight" or "bias", and in how
    many equal blocks a column-parallel one is sharded (3 for a fused qkv whose output is split)."""

    fqn: str
    plan: LinearPlan
    role: str
    blocks: int = 1


@dataclass
class LinearUse:
    """One planned linear where the graph computes it, in the form torch.export left it in."""

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


def ndim(node: fx.Node) -> int:
    return node.meta["val"].dim()


def through_views(node: fx.Node) -> fx.Node:
    """The last of a chain of single-user views after `node` that keep its last dim (a partial
    sum stays a partial sum through them); `node` itself if there are none."""
    while len(node.users) == 1:
        view = next(iter(node.users))
        if view.target not in VIEWS or view.args[0] is not node:
            break
        if view.meta["val"].shape[-1] != node.meta["val"].shape[-1]:
            break
        node = view
    return node


def static_numel(shape) -> Optional[int]:
    """The product of `shape`, or None if a size in it is symbolic."""
    n = 1
    for s in shape:
        if not isinstance(s, int):
            return None
        n *= s
    return n


def fused_blocks(w: fx.Node) -> int:
    """k if every linear of column-parallel weight `w` feeds, through views keeping its last dim,
    only one split of that dim into k > 1 equal parts (a fused qkv projection); else 1."""
    ks = set()
    for user in w.users:
        outs = list(user.users) if user.target in TRANSPOSES else [user]
        for out in outs:
            while len(out.users) == 1 and next(iter(out.users)).target in VIEWS:
                view = next(iter(out.users))
                if view.meta["val"].shape[-1] != out.meta["val"].shape[-1]:
                    break
                out = view
            split = next(iter(out.users)) if len(out.users) == 1 else None
            if split is None or split.target not in SPLITS or split.args[0] is not out:
                return 1
            dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
            sizes = [v.shape[dim] for v in split.meta["val"]]
            if dim % ndim(out) != ndim(out) - 1 or len(sizes) < 2 or len(set(sizes)) != 1:
                return 1
            ks.add(len(sizes))
    return ks.pop() if len(ks) == 1 else 1


def is_2d_transpose(node: fx.Node) -> bool:
    if node.target is ATEN.t.default:
        return True
    if node.target is ATEN.permute.default:
        return list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0])
    return {d % 2 for d in node.args[1:3]} == {0, 1}


def transposed_dim(node: fx.Node, dim: int) -> int:
    nd = node.args[0].meta["val"].dim()
    if node.target is ATEN.t.default:
        return 1 - dim if nd == 2 else dim
    if node.target is ATEN.permute.default:
        return [d % nd for d in node.args[1]].index(dim)
    a, b = (d % nd for d in node.args[1:3])
    return b if dim == a else a if dim == b else dim


def mm_linear(mm: fx.Node, wt: fx.Node, p: PlannedParam) -> Optional[LinearUse]:
    """An addmm(bias, x, wᵀ) or mm(x, wᵀ) that computes the planned linear, else None."""
    if mm.target is ATEN.addmm.default and mm.args[2] is wt and mm.args[1] is not wt:
        if any(mm.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return None
        return LinearUse(mm, p.fqn, p.plan, "addmm", mm.args[0], p.blocks)
    if mm.target is ATEN.mm.default and mm.args[1] is wt and mm.args[0] is not wt:
        return LinearUse(mm, p.fqn, p.plan, "mm", None, p.blocks)
    return None


def unsupported_use(fqn: str, user: fx.Node) -> None:
    raise ValueError(f"{fqn}: its weight is used by {user.target} (node {user.name}); only "
                     f"nn.Linear uses (aten.linear, or t/permute + mm/addmm) can be sharded")


def broadcast_dim(out: torch.Tensor, tensors: list[fx.Node], place: dict) -> Optional[int]:
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
