"""Backward split in two halves for zero-bubble schedules: input grads now (I), weight grads later (W).

I runs autograd only towards the stage inputs. On the way it records the gradient arriving at each
backward node where the path to the inputs and a path to some weights part ("split nodes"). W then
starts at those nodes with the recorded gradients and runs only the weight-side branches, so no work
of I is done twice. Weights that only outputs independent of the inputs reach (e.g. on the first
stage) get a plain backward from those outputs in W.

Both halves sit on the hot path of zero-bubble schedules, and on a GPU their Python must stay below
the kernels they launch (bench/results/PERFORMANCE.md): I walks the graph once and lets the engine capture the
split nodes' gradients; W computes the weight grads of linear layers and layer norms by hand from their
saved tensors (read during I), so that W makes no engine call and, when every split node is such a
node, I frees the rest of the graph at once. Other split nodes go through the engine in W.
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
    input (with their seeds): the roots themselves and the other seeds are let go here. Where W can do
    every split node by hand (`_direct_plan`), it keeps only the tensors those need, and I frees the rest
    of the graph as it goes (activations only the input side needed: attention, activation functions).
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

    # Read before I runs: with every split node done by hand, I need not keep the graph for W.
    plans = [_direct_plan(n, slots) if DIRECT else None for n, _, slots in split]
    by_hand = all(plan is not None for plan in plans)
    got, captured = _run_capturing(roots, grads, inputs, [n for n, _, _ in split], keep_graph=not by_hand)
    groups = [(None if by_hand else n, g, ws, slots, plan)
              for (n, ws, slots), g, plan in zip(split, captured, plans) if g is not None]
    return got, (groups, off_roots if rest else [], rest)


CAPTURE_EDGES = True  # False: always the pre-hooks (tests use it to check that path)


def _run_capturing(roots: list, grads: list, inputs: list, nodes: list, keep_graph: bool) -> tuple[list, list]:
    """Gradients for `inputs`, and for each of `nodes` the gradients arriving at it (None if none did).

    The engine captures them itself when asked for the node's incoming edges as extra inputs; where
    this torch does not say how many edges a node has, a pre-hook per node does it."""
    if CAPTURE_EDGES and all(hasattr(n, "_input_metadata") for n in nodes):
        counts = [len(n._input_metadata) for n in nodes]
        edges = [GradientEdge(n, i) for n, k in zip(nodes, counts) for i in range(k)]
        got = run_backward(roots, grads, list(inputs) + edges, accumulate=False, keep_graph=keep_graph)
        out, at = [], len(inputs)
        for k in counts:
            g = tuple(got[at:at + k])
            out.append(g if any(x is not None for x in g) else None)
            at += k
        return list(got[:len(inputs)]), out
    captured: dict[Any, tuple] = {}
    handles = [n.register_prehook(lambda g, n=n: captured.__setitem__(n, g)) for n in nodes]
    try:
        got = run_backward(roots, grads, inputs, accumulate=False, keep_graph=keep_graph)
    finally:
        for h in handles:
            h.remove()
    return list(got), [captured.get(n) for n in nodes]


def weight_grads(pending: Any) -> None:
    """Accumulate the weight gradients deferred by `input_grads` into `.grad`, top of the graph first;
    each split node is dropped once done, so a graph kept for the engine frees from the top."""
    if pending is None:
        return
    groups, off_roots, rest = pending
    groups.reverse()
    while groups:
        node, grad_outputs, weights, off_slots, plan = groups.pop()
        if plan is not None:
            _by_hand(plan, grad_outputs)
        else:
            _engine_weight_grads(node, grad_outputs, weights, off_slots)
        del node, grad_outputs, plan
    if rest:
        run_backward([r for r, _ in off_roots], [g for _, g in off_roots], rest, accumulate=True, keep_graph=False)
        off_roots.clear()


def _engine_weight_grads(node, grad_outputs: tuple, weights: list, off_slots: tuple) -> None:
    """W of one split node through the engine, in two calls: the node itself, asked only for the
    gradients of its weight-side children (asking it for the weights would also run its input side,
    which may lead to the same weights again and count them twice), then from those children down."""
    roots = [GradientEdge(node, i) for i, g in enumerate(grad_outputs) if g is not None]
    if not roots:
        return
    nf = node.next_functions
    children = [GradientEdge(*nf[i]) for i in off_slots]
    got = run_backward(roots, [g for g in grad_outputs if g is not None], children, accumulate=False,
                       keep_graph=True)
    below = [(c, g) for c, g in zip(children, got) if g is not None]
    if below:
        run_backward([c for c, _ in below], [g for _, g in below], weights, accumulate=True, keep_graph=True)


# ----------------------------------------------------------------------------------- direct W
# An engine call walks the whole graph below its root, so one call per split node costs time that grows
# with the square of the stage's depth. The split nodes of linear layers and layer norms (nearly all of
# them in a transformer) get their weight gradients here instead, from the node's saved tensors, with
# the same formulas autograd uses; anything else, or a parameter with tensor hooks, goes to the engine.
# Hooks on a parameter's AccumulateGrad node (torch DDP's reducer) do not run for these: set DIRECT to
# False to send every split node through the engine.
DIRECT = True


def _plain_param(node) -> torch.Tensor | None:
    """The parameter of an AccumulateGrad node, if nothing hooks it and its layout is plain."""
    if node is None or type(node) is not _ACCUMULATE:
        return None
    p = node.variable
    if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) or not p.is_contiguous():
        return None
    return p


def _direct_plan(node, off_slots: tuple) -> tuple | None:
    """What W needs to compute split node `node`'s weight grads by hand (its children at `off_slots` lead
    to weights, the others to the stage inputs), read from its saved tensors now; None if it is not a
    kind handled here: `mat1 @ mat2` with mat2 a parameter or its transpose (nn.Linear), layer norm."""
    name = type(node).__name__
    nf = node.next_functions
    if name == "MmBackward0" and off_slots == (1,):
        child = nf[1][0]
        transposed = type(child).__name__ == "TBackward0"
        p = _plain_param(child.next_functions[0][0] if transposed else child)
        if p is None:
            return None
        mat1, mat2 = node._saved_self, node._saved_mat2
        want = tuple(mat2.shape)[::-1] if transposed else tuple(mat2.shape)
        if mat1 is None or tuple(p.shape) != want or not p.dtype == mat1.dtype == mat2.dtype:
            return None
        return ("mm", p, mat1, transposed)
    if name == "NativeLayerNormBackward0" and 0 not in off_slots and len(nf) == 3:
        w, b = _plain_param(nf[1][0]), _plain_param(nf[2][0])
        if (w is None) != (nf[1][0] is None) or (b is None) != (nf[2][0] is None) or (w is None and b is None):
            return None  # a hooked or unusual weight or bias: the engine does it
        return ("ln", w, b, node._saved_input, node._saved_normalized_shape, node._saved_result1,
                node._saved_result2, node._saved_weight, node._saved_bias)
    return None


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


def _by_hand(plan: tuple, grad_outputs: tuple) -> None:
    """Accumulate the weight grads of one split node from its plan and the gradient that reached it."""
    g = grad_outputs[0]
    if g is None:
        return
    with torch.no_grad():
        if plan[0] == "mm":
            _, p, mat1, transposed = plan
            a, b = (g.t(), mat1) if transposed else (mat1.t(), g)
            if p.grad is None:
                p.grad = torch.mm(a, b)
            else:
                p.grad.addmm_(a, b)
            return
        _, w, b, x, shape, mean, rstd, weight, bias = plan
        _, gw, gb = torch.ops.aten.native_layer_norm_backward(
            g, x, shape, mean, rstd, weight, bias, [False, w is not None, b is not None])
        if w is not None:
            _accumulate(w, gw)
        if b is not None:
            _accumulate(b, gb)
