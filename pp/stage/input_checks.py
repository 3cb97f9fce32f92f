"""What a stage checks of its inputs before any transfer: the first stage's own inputs against its
traced graph, and what a producer announces (in a step whose shapes changed) against what the stage
takes. A mismatch is a ValueError naming the stage, the input, the traced shape and the received one.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .contract import _describe_value, check_shapes, graph_input_specs


class StageInputChecks:
    """The input checks of `PipelineStage` (a mixin: it reads the stage's `pipe_info`, `submod`,
    `device`, `input_args`, `is_first`, `activation_dtype`, `_expected` and `_accepted`)."""

    pipe_info: Any
    submod: Any
    device: torch.device
    stage_index: int

    def check_received(self, producer: int, meta: list) -> None:
        """ValueError if what stage `producer` announces for this stage's inputs (the metadata sent in a
        step whose shapes changed) is not what this stage expects: another input count (manual stages
        with `input_args`), another dtype, or a size the stage cannot take.

        A manual stage expects its `input_args`, with any batch size; a traced stage what its traced
        graph takes (sizes the model fixed, symbolic sizes meeting the model's shape conditions).
        Under autocast a floating input may also arrive in the autocast dtype.
        """
        expected = self._expected_inputs()
        if not expected:
            return
        # under autocast, or in a bf16 precision (activations cross stages in bf16), floating inputs
        # may arrive in that dtype
        autocast = autocast_dtype(self.device) or self.activation_dtype
        if self.pipe_info is not None and isinstance(self.submod, fx.GraphModule):
            slots = self.input_slots_from(producer, len(meta))
            specs = [expected[slot] if slot < len(expected) else None for slot in slots]
            values = [(e[1], e[2]) if e[0] == "t" else e[1] for e in meta]
            check_shapes(self.stage_index, specs, values, self._shape_guards(),
                         f" (from stage {producer})", autocast)
            return
        if self.pipe_info is None and len(meta) != len(expected):
            raise ValueError(f"stage {self.stage_index} expects {len(expected)} input(s) (its input_args) "
                             f"but stage {producer} sends {len(meta)}")
        for slot, entry in zip(self.input_slots_from(producer, len(meta)), meta):
            want = expected[slot] if slot < len(expected) else None
            if want is None:
                continue
            name, dtype, shape = want
            if entry[0] == "t" and (self._dtype_ok(entry[2], dtype) or (entry[2] == autocast and dtype.is_floating_point)) \
                    and len(entry[1]) == len(shape) and tuple(entry[1][1:]) == shape[1:]:
                continue
            got = _describe(entry[2], entry[1]) if entry[0] == "t" else f"the non-tensor value {entry[1]!r}"
            raise ValueError(f"stage {self.stage_index} {name} (from stage {producer}): expected "
                             f"{_describe(dtype, ('*',) + shape[1:] if shape else shape)}, got {got}")

    def check_model_inputs(self, flat: list) -> None:
        """ValueError (naming the input, the traced shape and the given one) if the first stage's own
        flat inputs for one microbatch are not what its traced graph takes; each accepted set of
        shapes is remembered, so a step with known shapes costs one lookup. Manual stages take anything
        their module does (nothing is checked)."""
        if not (self.pipe_info is not None and isinstance(self.submod, fx.GraphModule)):
            return
        autocast = autocast_dtype(self.device)
        key = (autocast, tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None for x in flat))
        if key in self._accepted:
            return
        check_shapes(self.stage_index, self._expected_inputs(), flat, self._shape_guards(),
                     autocast_dtype=autocast)
        if len(self._accepted) > 64:
            self._accepted.clear()
        self._accepted.add(key)

    def check_manual_inputs(self, args: tuple) -> None:
        """ValueError if a manual first stage given `input_args` gets positional inputs for one microbatch
        of another count, dtype or size past the batch dimension (as torch checks them, but before any
        rank sends anything, so the schedule stays usable). Without `input_args` nothing is checked."""
        if self.pipe_info is not None or self.input_args is None or not self.is_first:
            return
        want = (self.input_args,) if isinstance(self.input_args, torch.Tensor) else tuple(self.input_args)
        if len(args) != len(want):
            raise ValueError(f"stage {self.stage_index} expects {len(want)} positional input(s) (its input_args), "
                             f"got {len(args)}")
        autocast = autocast_dtype(self.device)
        for i, (a, w) in enumerate(zip(args, want)):
            ok = isinstance(a, torch.Tensor) and (self._dtype_ok(a.dtype, w.dtype) or (
                a.dtype == autocast and w.dtype.is_floating_point)) and a.dim() == w.dim() and a.shape[1:] == w.shape[1:]
            if not ok:
                got = _describe(a.dtype, tuple(a.shape)) if isinstance(a, torch.Tensor) else f"a {type(a).__name__}"
                raise ValueError(f"stage {self.stage_index} input {i}: expected "
                                 f"{_describe(w.dtype, ('*',) + tuple(w.shape[1:]))} (its input_args), got {got}")

    def _shape_guards(self) -> list:
        graph = getattr(self, "_mode_graph", None)
        return graph.guards if graph is not None else self.pipe_info.shape_guards

    def _dtype_ok(self, got: torch.dtype, want: torch.dtype) -> bool:
        # A stage traced in float32 that trains in bf16 (mixed or pure) receives bfloat16 activations.
        return got == want or (got == self.activation_dtype and want.is_floating_point)

    def _expected_inputs(self) -> list:
        """Per input slot what this stage expects, None where it does not say: an InputSpec for a
        traced stage, (name, dtype, shape) for a manual stage with input_args."""
        if self._expected is None:
            graph = getattr(self, "_mode_graph", None)   # the other mode's graph (pp.stage.modes)
            if graph is not None:
                self._expected = graph.specs
            elif self.pipe_info is not None and isinstance(self.submod, fx.GraphModule):
                self._expected = graph_input_specs(self.submod)
            elif self.input_args is not None and not self.is_first:
                args = (self.input_args,) if isinstance(self.input_args, torch.Tensor) else tuple(self.input_args)
                self._expected = [(f"input {i}", a.dtype, tuple(a.shape)) for i, a in enumerate(args)]
            else:
                self._expected = []
        return self._expected


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on `device`'s type now, None where autocast is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _describe(dtype: torch.dtype, shape: tuple) -> str:
    """'a float32 tensor of shape (*, 16)' (`*`: any batch size)."""
    return _describe_value(shape, dtype)
