"""torch's custom-function hook (`_PipelineScheduleRuntime.register_custom_function`) on every pp schedule.

`schedule.register_custom_function(FORWARD, fn)` makes the executor call `fn(action, ctx)` in place of its
own forward of each F action (likewise FULL_BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT), with torch's
`_Action` and `_PipelineContext`; the function computes through the stage's chunk methods, as under torch:

    def forward(action, ctx):
        stage = stages_by_index[action.stage_index]
        mb = action.microbatch_index
        out = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb])
        ctx.schedule_ref._maybe_compute_loss(stage, out, ctx.target_mbs, mb)

pp keeps what surrounds the computation: it waits for the action's receives before the call, hands
outputs and gradients to stages on the same rank and posts the sends after it, and refuses a step in
which the function returned without computing what the action stands for (no gradients would be made,
silently). A forward on the last stage whose function did not compute the loss gets it computed by pp.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from .actions import Kind
from .torch_actions import _ComputationType

# the computation types a custom function may replace, and pp's action kinds they stand for
_REPLACEABLE = {_ComputationType.FORWARD: Kind.F, _ComputationType.FULL_BACKWARD: Kind.B,
                _ComputationType.BACKWARD_INPUT: Kind.I, _ComputationType.BACKWARD_WEIGHT: Kind.W}
TORCH_TYPE = {kind: torch_type for torch_type, kind in _REPLACEABLE.items()}


@dataclass
class _PipelineContext:
    """What a custom function is given besides its action (torch's class and fields): the schedule, and
    this step's microbatches (args, kwargs and targets, one entry per microbatch) and losses list."""

    schedule_ref: Any
    arg_mbs: list | None = None
    kwarg_mbs: list | None = None
    target_mbs: list | None = None
    losses: list | None = None


class CustomFunctions:
    """`register_custom_function` and the helpers torch's custom functions call on the schedule (a mixin
    of the schedule base: it reads `_executor` and `n_microbatches`)."""

    _executor: Any
    n_microbatches: int

    def register_custom_function(self, computation_type: Any, custom_function: Callable[..., None]) -> None:
        """Run `custom_function(action, ctx)` in place of pp's own computation of every action of
        `computation_type` (FORWARD, FULL_BACKWARD, BACKWARD_INPUT or BACKWARD_WEIGHT, pp's or torch's
        constants, or their short forms "F", "B", "I", "W"), from the next step on. A second registration
        for one type replaces the first, with a warning (as torch).

        Raises ValueError for an unknown type, NotImplementedError for OVERLAP_F_B, UNSHARD, RESHARD and
        REDUCE_GRAD (pp runs an OVERLAP_F_B cell's actions one by one, and unshards, reshards and reduces
        gradients itself), TypeError for a function that is not callable.
        """
        try:
            kind = _ComputationType(getattr(computation_type, "value", computation_type))
        except ValueError:
            raise ValueError(f"register_custom_function: invalid computation type {computation_type!r}; "
                             f"expected FORWARD, FULL_BACKWARD, BACKWARD_INPUT or BACKWARD_WEIGHT") from None
        if kind not in _REPLACEABLE:
            raise NotImplementedError(
                f"register_custom_function({kind.name}): pp runs custom functions for FORWARD, FULL_BACKWARD, "
                f"BACKWARD_INPUT and BACKWARD_WEIGHT only; it runs an OVERLAP_F_B cell's actions one by one "
                f"(each through those functions) and unshards, reshards and reduces gradients itself")
        if not callable(custom_function):
            raise TypeError(f"register_custom_function: the custom function must be callable as "
                            f"fn(action, ctx), got {type(custom_function).__name__}")
        functions = self._executor.custom_functions
        if _REPLACEABLE[kind] in functions:
            warnings.warn(f"computation type {kind.name} is already registered; the new custom function "
                          f"replaces the old one", stacklevel=2)
        functions[_REPLACEABLE[kind]] = custom_function

    @property
    def _n_microbatches(self) -> int:
        """torch's name for the microbatch count (custom functions read it)."""
        return self.n_microbatches

    @property
    def backward_counter(self) -> Counter:
        """{stage index: backwards run this step} (torch's counter: pp counts its own B and W actions; a
        custom function counts the ones it runs, as under torch)."""
        return self._executor.backward_counter

    def _maybe_compute_loss(self, stage: Any, output: Any, target_mbs: Any, mb_index: int,
                            loss_kwargs: dict | None = None) -> None:
        """In a custom forward function: compute microbatch `mb_index`'s loss from `output` when `stage` is
        the last (with the step's loss_fn, loss keywords and target; `target_mbs` and `loss_kwargs` are
        taken for torch's signature). RuntimeError outside a step."""
        if stage.is_last:
            self._executor.compute_loss(stage, mb_index, output)

    def _maybe_get_loss(self, stage: Any, mb_index: int) -> Any:
        """The loss of microbatch `mb_index` on the last stage (None elsewhere, or before it is computed)."""
        st = stage._mb.get(mb_index) if stage.is_last else None
        return None if st is None else st.loss
