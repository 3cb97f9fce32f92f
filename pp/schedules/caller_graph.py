"""Inputs of `step()` that carry the caller's own autograd graph (`step(encoder(x))`: an encoder, an
embedding or a learned prompt computed outside the pipeline).

Each microbatch's backward would run into that graph, and the second one would find it freed ("Trying
to backward through the graph a second time") and leave the pipeline broken. The unsplit model with one
backward per batch sends the gradient into it once: so does pp. The first stage gets a leaf in the input's
place (same storage, no copy); after the step, the leaf's gradient (the sum over the microbatches) goes
into the caller's graph in one backward.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

__all__ = ["cut_caller_graph", "backward_into_caller"]


def cut_caller_graph(args: tuple, kwargs: dict) -> tuple[tuple, dict, list]:
    """`args`, `kwargs` with every tensor that has a `grad_fn` replaced by a detached leaf that requires
    grad, and the (original, leaf) pairs; leaves the caller made (`x.requires_grad_()`) stay as they are
    (their `.grad` fills as in the unsplit model)."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def cut(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.grad_fn is not None:
            leaf = x.detach().requires_grad_(True)
            pairs.append((x, leaf))
            return leaf
        return x

    if not torch.is_grad_enabled():
        return args, kwargs, pairs
    args, kwargs = pytree.tree_map(cut, (tuple(args), dict(kwargs)))
    return args, kwargs, pairs


def backward_into_caller(pairs: list) -> None:
    """One backward into the caller's graph from the leaves' gradients (those that got one)."""
    got = [(x, leaf.grad) for x, leaf in pairs if leaf.grad is not None]
    if got:
        torch.autograd.backward([x for x, _ in got], [g for _, g in got])
