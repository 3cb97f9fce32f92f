"""Training precision: fp32, bf16-mixed (fp32 master weights, bf16 compute under torch.autocast) and
pure bf16, applied to the runtime stages of `pp.parallelize`.

`bf16-mixed` keeps parameters, gradients and AdamW state in float32: each stage's forward runs under
`torch.autocast(device_type, dtype=torch.bfloat16)`, the activations a stage sends (and the gradients
coming back) are bfloat16, and every microbatch's bfloat16 weight gradient is accumulated into the
float32 `.grad` by autograd's cast, so data-parallel reductions and the gradient norm stay in float32.
`bf16` casts the parameters themselves (and so gradients and optimizer state) to bfloat16.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from pp.stage.runtime import PipelineStage

__all__ = ["PRECISIONS", "check_precision", "param_dtype", "cast_module", "apply_precision"]

PRECISIONS = ("fp32", "bf16-mixed", "bf16")


def check_precision(precision: object, key: str = "precision") -> str:
    """`precision` itself if it is one of `PRECISIONS`, else ValueError naming `key` and the value."""
    if precision not in PRECISIONS:
        raise ValueError(f"{key}={precision!r} is not a precision pp knows; expected one of "
                         f"{', '.join(PRECISIONS)}")
    return precision  # type: ignore[return-value]


def param_dtype(precision: str) -> torch.dtype:
    """The dtype parameters are kept in: float32, except bfloat16 for pure `bf16`."""
    return torch.bfloat16 if check_precision(precision) == "bf16" else torch.float32


def cast_module(module: nn.Module, precision: str) -> nn.Module:
    """`module` with its floating parameters and buffers in `param_dtype(precision)` (in place)."""
    dtype = param_dtype(precision)
    if any(t.is_floating_point() and t.dtype != dtype for t in (*module.parameters(), *module.buffers())):
        module.to(dtype)
    return module


def apply_precision(stage: PipelineStage, precision: str) -> None:
    """Make `stage` compute in `precision`: bf16-mixed turns autocast on around its forward; both bf16
    settings make it send (and accept) bfloat16 activations where it was traced with float32 ones."""
    check_precision(precision)
    if precision == "fp32":
        return
    stage.activation_dtype = torch.bfloat16
    stage.autocast = precision == "bf16-mixed"
