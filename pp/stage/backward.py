"""Backward split in two halves for zero-bubble schedules: input grads now (I), weight grads later (W).

I runs autograd only towards the stage inputs. On the way it records the gradient arriving at each
backward node where the path to the inputs and a path to some weights part ("split nodes"). W then
starts at those nodes with the recorded gradients and runs only the weight-side branches, so no work
of I is done twice. Weights that no input path reaches (e.g. on the first stage) get a plain backward.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


def _grad_node(t: torch.Tensor):
    return get_gradient_edge(t).node


def input_grads(roots: list[torch.Tensor], grads: list, inputs: list[torch.Tensor],
                params: list[torch.Tensor]) -> tuple[list, Any]:
    """Gradients of `roots` (seeded with `grads`) for `inputs`; returns them and the state W needs."""
    if not roots:
        return [None] * len(inputs), None
    if not inputs:
        return [], (roots, grads, params, [])
    input_nodes = {_grad_node(x) for x in inputs}
    param_of = {_grad_node(p): p for p in params}
    reaches_input: dict[Any, bool] = {}

    def on_input_path(node) -> bool:
        # Iterative DFS: autograd graphs of deep stages overflow Python recursion.
        if node in reaches_input:
            return reaches_input[node]
        stack = [(node, False)]
        while stack:
            n, expanded = stack.pop()
            if n in reaches_input:
                continue
            children = [c for c, _ in n.next_functions if c is not None]
            if not expanded:
                stack.append((n, True))
                stack.extend((c, False) for c in children if c not in reaches_input)
            else:
                reaches_input[n] = n in input_nodes or any(reaches_input.get(c, False) for c in children)
        return reaches_input[node]

    def weights_below(node) -> list[torch.Tensor]:
        found, stack, seen = [], [node], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in param_of:
                found.append(param_of[n])
            stack.extend(c for c, _ in n.next_functions if c is not None and not reaches_input.get(c, False))
        return found

    split_nodes: dict[Any, list[torch.Tensor]] = {}
    covered: set[int] = set()
    stack, seen = [r.grad_fn for r in roots if r.grad_fn is not None], set()
    for n in stack:
        on_input_path(n)
    while stack:
        n = stack.pop()
        if n in seen or not reaches_input.get(n, False):
            continue
        seen.add(n)
        weights = []
        for child, _ in n.next_functions:
            if child is None:
                continue
            if reaches_input.get(child, False):
                stack.append(child)
            else:
                weights.extend(weights_below(child))
        if weights:
            split_nodes[n] = weights
            covered.update(id(w) for w in weights)

    captured: dict[Any, tuple] = {}
    handles = [n.register_prehook(lambda g, n=n: captured.__setitem__(n, g)) for n in split_nodes]
    try:
        got = torch.autograd.grad(roots, inputs, grads, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    groups = [(n, captured[n], ws) for n, ws in split_nodes.items() if n in captured]
    rest = [p for p in params if id(p) not in covered]
    return list(got), (roots, grads, rest, groups)


def weight_grads(pending: Any) -> None:
    """Accumulate the weight gradients deferred by `input_grads` into `.grad`."""
    if pending is None:
        return
    roots, grads, rest, groups = pending
    for node, grad_outputs, weights in groups:
        edges = [GradientEdge(node, i) for i, g in enumerate(grad_outputs) if g is not None]
        seeds = [g for g in grad_outputs if g is not None]
        if not edges:
            continue
        unique = list({id(w): w for w in weights}.values())
        got = torch.autograd.grad(edges, unique, seeds, retain_graph=True, allow_unused=True)
        for w, g in zip(unique, got):
            if g is not None:
                if w.grad is None:
                    w.grad = g
                else:
                    w.grad.add_(g)
    if rest:
        reachable = [p for p in rest if p.requires_grad]
        if reachable:
            torch.autograd.backward(roots, grads, inputs=reachable)
