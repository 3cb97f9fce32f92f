"""Loss functions for the last stage, written for its memory: a language model's logits are often the
largest tensor a pipeline rank holds (microbatch x sequence x vocabulary values).

`chunked_cross_entropy` is cross-entropy in float32 over row chunks, each recomputed in backward
(`torch.utils.checkpoint`), so the float32 copy, the log-softmax it saves and their gradients exist for one
chunk at a time instead of for the whole microbatch: about 6 bytes per logit held at the peak of the
backward instead of 14 for bf16 logits (the same idea as torchtune's chunked output loss; a fused
linear-cross-entropy kernel would also drop the logits themselves).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 512 MiB in float32; smaller logits take one plain call
IGNORE_INDEX = -100       # F.cross_entropy's default: such targets count neither in the sum nor the mean


def _summed(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                          chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of `logits` (..., V; any float dtype) against class ids `targets` (..., int64),
    computed in float32, over the targets that are not -100; a float32 scalar.

    Equal to `F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())` up to float rounding of
    the sum. When `logits` has more than `chunk_elements` values, rows are taken in chunks of
    max(1, chunk_elements // V) rows, each recomputed in backward, so the float32 intermediates exist for one chunk at
    a time. No host-device sync. ValueError if `chunk_elements` is not a positive integer, `logits` is
    not floating point with at least 2 dimensions, or the shapes do not match.
    """
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, numbers.Integral) or chunk_elements < 1:
        raise ValueError(f"chunk_elements must be a positive integer, got {chunk_elements!r}")
    if logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be floating point with a batch and a class dimension (..., V), got a "
                         f"{str(logits.dtype).replace('torch.', '')} tensor of shape {tuple(logits.shape)}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    flat, t = logits.flatten(0, -2), targets.flatten()
    rows = max(1, chunk_elements // max(flat.shape[-1], 1))
    if flat.shape[0] <= rows:
        return F.cross_entropy(flat.float(), t, ignore_index=IGNORE_INDEX)
    total = None
    for x, y in zip(flat.split(rows), t.split(rows)):
        part = (checkpoint(_summed, x, y, use_reentrant=False, preserve_rng_state=False)  # no randomness to replay
                if torch.is_grad_enabled() else _summed(x, y))
        total = part if total is None else total + part
    return total / (t != IGNORE_INDEX).sum()
