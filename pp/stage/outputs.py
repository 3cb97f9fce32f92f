"""What a manual stage hands the next: its outputs as the values it sends (tensors on their own, a
nested structure as its leaves plus a `Nested` record of it), and which of them carry a gradient back.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree


def differentiable(value: Any) -> bool:
    """Whether a stage output carries a gradient back: a floating or complex tensor that requires grad."""
    return isinstance(value, torch.Tensor) and value.requires_grad and (
        value.is_floating_point() or value.is_complex())


class Nested:
    """The structure of a manual stage's outputs that nest (a dict, a tuple inside the tuple: Llama's
    `(h, (cos, sin))`): the stage sends their leaves, each tensor on its own with its gradient coming
    back, and this last value, from which the next stage rebuilds its positional inputs."""

    __slots__ = ("spec",)

    def __init__(self, spec: pytree.TreeSpec):
        self.spec = spec

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Nested) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(str(self.spec))

    def __getstate__(self):   # sent as the containers with 0 for each leaf (a TreeSpec pickles noisily)
        return pytree.tree_unflatten([0] * self.spec.num_leaves, self.spec)

    def __setstate__(self, skeleton):
        self.spec = pytree.tree_flatten(skeleton)[1]

    def __repr__(self) -> str:
        return f"Nested({self.spec})"


def flat_outputs(out: Any) -> tuple:
    """A manual stage's outputs as the values it sends: the top-level ones, or where any of them is a
    container, their leaves and then their `Nested` structure."""
    top = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    if not any(isinstance(v, (tuple, list, dict)) for v in top):
        return top
    leaves, spec = pytree.tree_flatten(top)
    return (*leaves, Nested(spec))


def positional(inputs: list) -> list:
    """A manual stage's received inputs as its forward takes them (`Nested` outputs rebuilt)."""
    if inputs and isinstance(inputs[-1], Nested):
        return list(pytree.tree_unflatten(list(inputs[:-1]), inputs[-1].spec))
    return inputs
