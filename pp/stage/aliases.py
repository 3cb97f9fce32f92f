"""A manual stage's inputs as its module may modify them in place, as the unsplit model's layers may.

A received activation is a leaf that requires grad (its gradient is sent back to its producer), and the
first stage's inputs that require grad are views of such a leaf: autograd refuses an in-place op on
either (`nn.ReLU(inplace=True)` first in a stage), where in the unsplit model the same tensor is an
intermediate that may be modified. Each is handed to the module through an alias that is an
intermediate of the leaf: the same storage, no copy; the gradient passes through unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree


class _Alias(torch.autograd.Function):
    """Identity whose output is an intermediate (not a leaf, not a view) sharing its input's storage."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        # its own version counter (a detach() would share the batch's with every microbatch's view)
        return x.new_empty(0).set_(x.untyped_storage(), x.storage_offset(), x.size(), x.stride())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _alias(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.requires_grad and type(x) is torch.Tensor and torch.is_grad_enabled() \
            and (x.is_leaf or x._base is not None):
        return _Alias.apply(x)
    return x


def inplace_safe(values: Any) -> Any:
    """`values` (a pytree) with each tensor that requires grad and is a leaf or a view handed over as an
    intermediate alias of it (`_Alias`); everything else as it is. Costs one autograd node per such
    tensor, no memory."""
    return pytree.tree_map(_alias, values)
