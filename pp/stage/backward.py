"""Backward split in two halves for zero-bubble schedules: input grads now (I), weight grads later (W).

I runs autograd only towards the stage inputs. On the way it records the gradient arriving at each
backward node where the path to the inputs and a path to some weights part ("split nodes"). W then
starts at those nodes with the recorded gradients and runs only the weight-side branches, so no work
of I is done twice. Weights that only outputs independent of the inputs reach (e.g. on the first
stage) get a plain backward from those outputs in W.

Both halves sit on the hot path of zero-bubble schedules, and on a GPU their Python must stay well
below the kernels they launch: one walk of the graph per I, one engine call per split node in W (the
engine accumulates into `.grad` itself), and W drops each split node as soon as its call is done so
that the graph is freed from the top while W runs.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

# The engine entry torch.autograd.grad/backward end in; calling it directly skips their per-call
# argument checks (about two thirds of a small call's CPU time). The public API is the fallback.
_ENGINE = getattr(torch.autograd.graph, "_engine_run_backward", None)


def run_backward(roots: Sequence, seeds: Sequence[torch.Tensor], inputs: Sequence = (), *,
                 accumulate: bool, keep_graph: bool) -> tuple:
    """One autograd engine call from `roots` (tensors or GradientEdges) seeded with `seeds` (no None).

    accumulate=True adds into `.grad` of `inputs` (of every leaf when empty) and returns (); otherwise
    returns the gradients of `inputs` (None where unreachable).
    """
    if _ENGINE is not None and all(type(s) is torch.Tensor for s in seeds):
        return _ENGINE(tuple(roots), tuple(seeds), keep_graph, False, tuple(inputs),
                       allow_unreachable=True, accumulate_grad=accumulate)
    if accumulate:
        torch.autograd.backward(list(roots), list(seeds), retain_graph=keep_graph, inputs=list(inputs) or None)
        return ()
    return torch.autograd.grad(list(roots), list(inputs), list(seeds), retain_graph=keep_graph,
                               allow_unused=True)


def _node(t: torch.Tensor):
    return get_gradient_edge(t).node


def _walk(root_nodes: list, input_nodes: set) -> tuple[dict, dict]:
    """One iterative DFS (deep stages overflow recursion): each node's children, and whether it reaches
    a stage input."""
    kids: dict[Any, list] = {}
    on_path: dict[Any, bool] = {}
    stack = list(root_nodes)
    while stack:
        n = stack[-1]
        ks = kids.get(n)
        if ks is None:
            ks = kids[n] = [c for c, _ in n.next_functions if c is not None]
            stack.extend(c for c in ks if c not in kids)
            continue
        stack.pop()
        if n not in on_path:
            on_path[n] = n in input_nodes or any(on_path[c] for c in ks)
    return kids, on_path


_ACCUMULATE = torch._C._functions.AccumulateGrad


def _weights_below(nodes: list, kids: dict, param_ids: set) -> list[torch.Tensor]:
    found: dict[int, torch.Tensor] = {}
    stack, seen = list(nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if type(n) is _ACCUMULATE and id(n.variable) in param_ids:
            found[id(n.variable)] = n.variable
        stack.extend(kids[n])
    return list(found.values())


def input_grads(roots: list[torch.Tensor], grads: list, inputs: list[torch.Tensor],
                params: list[torch.Tensor]) -> tuple[list, Any]:
    """Gradients of `roots` (seeded with `grads`, no None) for `inputs`; returns them and W's state.

    W's state keeps only split nodes with their captured gradients, and the roots that do not reach any
    input (with their seeds): the roots themselves and the other seeds are let go here.
    """
    if not roots:
        return [None] * len(inputs), None
    if not inputs:  # nothing to hand back (first stage): W is the whole backward
        return [], ([], list(zip(roots, grads)), list(params))
    root_nodes = [r.grad_fn for r in roots]
    input_nodes = {_node(x) for x in inputs}
    kids, on_path = _walk([n for n in root_nodes if n is not None], input_nodes)
    param_ids = {id(p) for p in params}

    # Split nodes: on the input path, with a child off it that leads to weights.
    split: list[tuple[Any, list, tuple]] = []
    stack = [n for n in root_nodes if n is not None and on_path[n]]
    seen = set(stack)
    while stack:
        n = stack.pop()
        off = []
        for c in kids[n]:
            if on_path[c]:
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
            else:
                off.append(c)
        if off:
            weights = _weights_below(off, kids, param_ids)
            if weights:
                off_slots = tuple(i for i, (c, _) in enumerate(n.next_functions) if c is not None and not on_path[c])
                split.append((n, weights, off_slots))

    # Roots off the input path (all of them on the first stage) keep their seeds for a plain W.
    off_roots = [(r, g) for r, n, g in zip(roots, root_nodes, grads) if n is not None and not on_path[n]]
    rest = _weights_below([r.grad_fn for r, _ in off_roots], kids, param_ids) if off_roots else []

    captured: dict[Any, tuple] = {}
    handles = [n.register_prehook(lambda g, n=n: captured.__setitem__(n, g)) for n, _, _ in split]
    try:
        got = run_backward(roots, grads, inputs, accumulate=False, keep_graph=True)
    finally:
        for h in handles:
            h.remove()
    groups = [(n, captured[n], ws, slots) for n, ws, slots in split if n in captured]
    return list(got), (groups, off_roots if rest else [], rest)


def weight_grads(pending: Any) -> None:
    """Accumulate the weight gradients deferred by `input_grads` into `.grad`, one engine call per split
    node, top of the graph first; each node is dropped once done, so the graph frees from the top."""
    if pending is None:
        return
    groups, off_roots, rest = pending
    groups.reverse()
    while groups:
        node, grad_outputs, weights, off_slots = groups.pop()
        if not (DIRECT and _direct(node, grad_outputs, off_slots)):
            edges = [GradientEdge(node, i) for i, g in enumerate(grad_outputs) if g is not None]
            if edges:
                seeds = [g for g in grad_outputs if g is not None]
                run_backward(edges, seeds, weights, accumulate=True, keep_graph=True)
            del edges
        del node, grad_outputs
    if rest:
        run_backward([r for r, _ in off_roots], [g for _, g in off_roots], rest, accumulate=True, keep_graph=False)
        off_roots.clear()


# ----------------------------------------------------------------------------------- direct W
# An engine call walks the whole graph below its root, so one call per split node costs time that grows
# with the square of the stage's depth. The split nodes of linear layers and layer norms (nearly all of
# them in a transformer) get their weight gradients here instead, from the node's saved tensors, with
# the same formulas autograd uses; anything else, or a parameter with hooks, goes to the engine.
DIRECT = True


def _plain_param(node) -> torch.Tensor | None:
    """The parameter of an AccumulateGrad node, if nothing hooks it and its layout is plain."""
    if node is None or type(node).__name__ != "AccumulateGrad":
        return None
    p = node.variable
    if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) or not p.is_contiguous():
        return None
    return p


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


def _mm_weight(child, mat1: torch.Tensor, g: torch.Tensor) -> bool:
    """Weight grad of `mat1 @ mat2` where mat2 is a parameter (child AccumulateGrad) or its transpose
    (child TBackward0 -> AccumulateGrad, i.e. nn.Linear)."""
    if type(child).__name__ == "TBackward0":
        p = _plain_param(child.next_functions[0][0])
        if p is None or p.shape != (g.shape[1], mat1.shape[1]) or not p.dtype == g.dtype == mat1.dtype:
            return False
        if p.grad is None:
            p.grad = torch.mm(g.t(), mat1)
        else:
            p.grad.addmm_(g.t(), mat1)
        return True
    p = _plain_param(child)
    if p is None or p.shape != (mat1.shape[1], g.shape[1]) or not p.dtype == g.dtype == mat1.dtype:
        return False
    if p.grad is None:
        p.grad = torch.mm(mat1.t(), g)
    else:
        p.grad.addmm_(mat1.t(), g)
    return True


def _direct(node, grad_outputs: tuple, off_slots: tuple) -> bool:
    """Accumulate the weight grads of split node `node` (its children at `off_slots` lead to weights, the
    others to the stage inputs) without the engine; False if it is not a kind handled here (then nothing
    was done)."""
    name = type(node).__name__
    nf = node.next_functions
    with torch.no_grad():
        if name == "MmBackward0" and off_slots == (1,) and len(grad_outputs) == 1 and grad_outputs[0] is not None:
            return nf[1][0] is not None and _mm_weight(nf[1][0], node._saved_self, grad_outputs[0])
        if name == "NativeLayerNormBackward0" and 0 not in off_slots and grad_outputs[0] is not None:
            w, b = _plain_param(nf[1][0]), _plain_param(nf[2][0])
            if (w is None) != (nf[1][0] is None) or (b is None) != (nf[2][0] is None) or w is None and b is None:
                return False  # a hooked or unusual weight/bias: the engine does it
            _, gw, gb = torch.ops.aten.native_layer_norm_backward(
                grad_outputs[0], node._saved_input, node._saved_normalized_shape, node._saved_result1,
                node._saved_result2, node._saved_weight, node._saved_bias, [False, w is not None, b is not None])
            if w is not None:
                _accumulate(w, gw)
            if b is not None:
                _accumulate(b, gb)
            return True
    return False
