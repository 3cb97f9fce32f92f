"""Weight-side gradients of split nodes computed by hand (W of `pp.stage.backward`), from a node's saved
tensors with the formulas autograd uses: linear layers (`mm`, `addmm`), layer norm, elementwise `mul` and
`add`.

An engine call walks the whole graph below its root, so one call per split node costs time that grows
with the square of the stage's depth; these kinds are nearly all the split nodes of a transformer. A
transpose made for one use alone is folded into the product. A parameter that W may write itself (see
`NODE_HOOKS` in `pp.stage.backward`) gets its share added to `.grad` here (linear weights inside the
product: `addmm_`); every other gradient goes back to the caller as (edge, gradient), for autograd.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch.autograd.graph import GradientEdge


def _edge(entry: tuple, indeg: Counter) -> tuple[GradientEdge, bool]:
    """The edge a weight-side gradient is handed to, and whether it is to be transposed."""
    c, k = entry
    if type(c).__name__ == "TBackward0" and indeg[c] == 1:
        return GradientEdge(*c.next_functions[0]), True
    return GradientEdge(c, k), False


def direct_plan(node, slots: tuple, indeg: Counter, plain: Callable) -> tuple | None:
    """What W needs to compute split node `node`'s weight-side gradients by hand (its children at `slots`
    lie off the input path), read from its saved tensors now: (kind, saved..., [(slot, edge, transposed,
    parameter written by hand or None)]); None if it is not a kind handled here (or a needed tensor was
    not saved). `plain(node)`: the parameter of an AccumulateGrad node that W may write itself, or None."""
    name = type(node).__name__
    nf = node.next_functions
    matrices = {"MmBackward0": (0, 1), "AddmmBackward0": (1, 2)}.get(name, ())
    outs = []
    for s in slots:
        edge, tr = _edge(nf[s], indeg) if s in matrices else (GradientEdge(*nf[s]), False)
        outs.append((s, edge, tr, plain(edge.node)))
    if name == "MmBackward0":
        a, b = getattr(node, "_saved_self", None), getattr(node, "_saved_mat2", None)
        return None if (0 in slots and b is None) or (1 in slots and a is None) else ("mm", a, b, 1, 1, outs)
    if name == "AddmmBackward0":
        a, b = getattr(node, "_saved_mat1", None), getattr(node, "_saved_mat2", None)
        if (1 in slots and b is None) or (2 in slots and a is None):
            return None
        return ("addmm", a, b, node._saved_alpha, node._saved_beta, outs)
    if name == "MulBackward0":
        a, b = getattr(node, "_saved_self", None), getattr(node, "_saved_other", None)
        if (0 in slots and b is None) or (1 in slots and a is None) or any(
                t is not None and t.is_complex() for t in (a, b)):
            return None
        return ("mul", a, b, outs)
    if name == "AddBackward0":
        return ("add", node._saved_alpha, outs)
    if name == "NativeLayerNormBackward0" and 0 not in slots and len(nf) == 3:
        return ("ln", node._saved_input, node._saved_normalized_shape, node._saved_result1,
                node._saved_result2, node._saved_weight, node._saved_bias, outs)
    return None


# dtypes whose `.grad` W adds a linear weight's gradient into inside the product (`addmm_`, one rounding);
# in bfloat16 or float16 that differs visibly from autograd's product-then-add (two roundings), which
# every other schedule gives, so there W adds the rounded product as autograd does.
_FUSED_DTYPES = (torch.float32, torch.float64)


def by_hand(plan: tuple, g: torch.Tensor | None) -> list:
    """The weight-side gradients of one split node from its plan and the gradient that reached it: added
    to `.grad` where the plan says so, the others returned as (edge, gradient) pairs for autograd."""
    if g is None:
        return []
    kind, outs = plan[0], plan[-1]
    seeds: list = []
    with torch.no_grad():
        if kind in ("mm", "addmm"):
            _, mat1, mat2, alpha, beta, _ = plan
            base = 1 if kind == "addmm" else 0   # addmm's slot 0 is the added tensor (the bias)
            for s, edge, tr, p in outs:
                if s == base - 1:
                    _give(p, edge, g if beta == 1 else g * beta, beta != 1, seeds)
                    continue
                a, b = (g, mat2.t()) if s == base else (mat1.t(), g)
                if tr:
                    a, b = b.t(), a.t()
                if p is not None and p.dtype == a.dtype and (p.grad is None or a.dtype in _FUSED_DTYPES):
                    if p.grad is None:
                        p.grad = torch.mm(a, b) if alpha == 1 else torch.mm(a, b).mul_(alpha)
                    else:
                        p.grad.addmm_(a, b, alpha=alpha)
                elif p is not None:   # a float32 master of a bfloat16 weight copy (bf16-mixed), or a bf16 .grad
                    _give(p, edge, torch.mm(a, b) if alpha == 1 else torch.mm(a, b).mul_(alpha), True, seeds)
                else:
                    seeds.append((edge, torch.mm(a, b) if alpha == 1 else torch.mm(a, b).mul_(alpha)))
        elif kind == "mul":
            _, a, b, _ = plan
            for s, edge, _, p in outs:
                _give(p, edge, g * (b if s == 0 else a), True, seeds)
        elif kind == "add":
            alpha = plan[1]
            for s, edge, _, p in outs:
                scaled = s == 1 and alpha != 1
                _give(p, edge, g * alpha if scaled else g, scaled, seeds)
        else:
            _, x, shape, mean, rstd, weight, bias, _ = plan
            mask = [False, any(o[0] == 1 for o in outs), any(o[0] == 2 for o in outs)]
            _, gw, gb = torch.ops.aten.native_layer_norm_backward(g, x, shape, mean, rstd, weight, bias, mask)
            for s, edge, _, p in outs:
                _give(p, edge, gw if s == 1 else gb, True, seeds)
    return seeds


def _give(p: torch.Tensor | None, edge: GradientEdge, g: torch.Tensor, fresh: bool, seeds: list) -> None:
    """Add g into p's `.grad` (reduced to p's shape and cast to its dtype, as autograd would), or, with no
    p, keep it as a seed for autograd. `fresh`: g is this function's to keep (no one else holds it)."""
    if p is None:
        seeds.append((edge, g))
        return
    if g.shape != p.shape:
        g, fresh = g.sum_to_size(p.shape), True
    if p.grad is not None and torch.promote_types(g.dtype, p.dtype) == p.dtype:
        p.grad.add_(g)      # a bfloat16 g goes into a float32 `.grad` exactly, without a cast copy first
        return
    if g.dtype != p.dtype:
        g, fresh = g.to(p.dtype), True
    if p.grad is not None:
        p.grad.add_(g)
    else:
        p.grad = g if fresh and g.is_contiguous() else g.clone(memory_format=torch.contiguous_format)
