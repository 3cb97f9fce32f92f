"""`Pipe`: the traced model cut into stage modules, with the wiring between them (`PipeInfo`)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .modes import call_with_forward, mode_forward

# Source of a stage input: (stage, index of that stage's output), or (MODEL_INPUT, i) for stage 0.
MODEL_INPUT = -1


@dataclass
class StageIO:
    """How one stage connects: where each input comes from and which stages read each output."""

    input_sources: list[tuple[int, int]]
    output_consumers: list[list[tuple[int, int]]]  # per output: (consumer stage, its input slot)

    @property
    def producers(self) -> list[int]:
        return sorted({s for s, _ in self.input_sources if s != MODEL_INPUT})

    @property
    def consumers(self) -> list[int]:
        return sorted({c for outs in self.output_consumers for c, _ in outs})


@dataclass
class PipeInfo:
    """What a stage runtime needs to know about the whole pipe: wiring, input binding, output shape."""

    num_stages: int
    stage_io: list[StageIO]
    input_binder: "InputBinder"
    out_spec: pytree.TreeSpec
    # parameter name -> stages holding it, for parameters used by more than one stage
    shared_params: dict[str, list[int]] = field(default_factory=dict)
    # shape and dtype of each shared parameter, so ranks without it can take part in its gradient sum
    param_meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    has_loss_and_backward: bool = False
    # conditions on the traced input sizes (sympy relations; see stage/contract.py), empty if all fixed
    shape_guards: list = field(default_factory=list)
    # buffer updated in forward -> (stages reading it, stage updating it), where some reader is another
    # stage: right when the Pipe is called in one process (the stages share the tensor), wrong pipelined
    stale_buffers: dict[str, tuple[list[int], int]] = field(default_factory=dict)
    # buffers the forward updates (batch norm's running statistics), by the model's names: replicas of
    # a stage keep them equal by averaging them once per step (pp.parallelize with dp > 1)
    mutated_buffers: list[str] = field(default_factory=list)
    # the mode the model was traced in and how to trace it in the other (pp.stage.modes), None if unknown
    mode_traces: Any = None

    @property
    def edges(self) -> dict[int, list[int]]:
        return {s: io.consumers for s, io in enumerate(self.stage_io)}


class InputBinder:
    """Turns a call's (*args, **kwargs) into the flat inputs of stage 0, as at trace time.

    Defaults fill missing arguments, and non-tensor inputs must equal the value traced, since the
    exported graph has that value baked in; anything else is a clear error rather than a silent change.
    """

    def __init__(self, forward, example_args: tuple, example_kwargs: dict, in_spec: pytree.TreeSpec,
                 traced_constants: dict[int, Any]):
        self.n_args = len(example_args)
        self.kwarg_names = list(example_kwargs)
        self.in_spec = in_spec
        self.traced_constants = traced_constants  # flat index -> value baked into the graph
        try:
            self.signature = inspect.signature(forward)
        except (TypeError, ValueError):
            self.signature = None
        if self.signature is not None and any(
                p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in self.signature.parameters.values()):
            self.signature = None
        self.num_inputs = in_spec.num_leaves

    def _normalise(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.signature is None:
            return tuple(args), dict(kwargs)
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"pipeline inputs do not match the model's forward{self.signature}: {e}") from None
        bound.apply_defaults()
        names = list(self.signature.parameters)
        pos = tuple(bound.arguments[n] for n in names[: self.n_args])
        kw = {k: bound.arguments[k] for k in self.kwarg_names}
        for name in names[self.n_args:]:
            if name in self.kwarg_names:
                continue
            default = self.signature.parameters[name].default
            given = bound.arguments.get(name, default)
            if given is not default and not _same_constant(given, default):
                raise ValueError(
                    f"argument {name!r} was not part of the example inputs when the model was traced, so "
                    f"the pipeline uses its default {default!r}; pass it in mb_args/mb_kwargs to pipeline()"
                )
        return pos, kw

    def flatten(self, args: tuple, kwargs: dict | None) -> list[Any]:
        """Flat stage-0 inputs for one call (a whole batch or one microbatch)."""
        pos, kw = self._normalise(tuple(args), dict(kwargs or {}))
        flat, spec = pytree.tree_flatten((pos, kw))
        if spec != self.in_spec:
            traced = pytree.tree_unflatten([_TRACED] * self.in_spec.num_leaves, self.in_spec)
            raise ValueError(f"the inputs are {_outline(pos)} and {_outline(kw)}, but the model was traced with "
                             f"{_outline(traced[0])} and {_outline(traced[1])}: pass them as in the example")
        for i, value in self.traced_constants.items():
            if not _same_constant(flat[i], value):
                raise ValueError(
                    f"{_input_name((pos, kw), i)} is {flat[i]!r} but the model was traced with {value!r}; "
                    f"non-tensor inputs are fixed at trace time"
                )
        return flat

    def normalise(self, args: tuple, kwargs: dict | None) -> tuple[tuple, dict]:
        """(args, kwargs) with defaults applied, in the layout of the traced example."""
        return self._normalise(tuple(args), dict(kwargs or {}))


def _input_name(inputs: tuple, i: int) -> str:
    """Leaf `i` of flattened (args, kwargs) as the caller wrote it: "keyword 'scale'", "positional input 1",
    with the path inside a structure ("keyword 'cfg'['eps']")."""
    path = pytree.tree_flatten_with_path(inputs)[0][i][0]
    head, rest = path[1], pytree.keystr(path[2:])
    if len(path) > 1 and isinstance(head, pytree.MappingKey) and path[0] == pytree.SequenceKey(1):
        return f"keyword {head.key!r}{rest}"
    return f"positional input {getattr(head, 'idx', head)}{rest}"


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else a is b
    except Exception:
        return a is b


class Pipe(nn.Module):
    """A model cut into `num_stages` stage modules that keep the original parameter names.

    Calling the pipe runs the stages one after another in this process, which is how the split is
    checked against the unsplit model; `build_stage` gives the runtime stage for one rank.
    """

    def __init__(self, stage_modules: list[nn.Module], info: PipeInfo):
        super().__init__()
        self.stage_modules = nn.ModuleList(stage_modules)
        self._info = info
        self._specs: dict[int, list] = {}   # stage -> its inputs' InputSpecs (read from its graph once)
        self._call_guards: list | None = None   # the shape conditions a direct call checks (see forward)
        self._mode_graphs: dict[tuple[int, bool], Any] = {}   # (stage, mode) -> its ModeGraph, or None

    @property
    def num_stages(self) -> int:
        return self._info.num_stages

    @property
    def has_loss_and_backward(self) -> bool:
        return self._info.has_loss_and_backward

    def get_stage_module(self, stage_idx: int) -> nn.Module:
        if not isinstance(stage_idx, int) or not 0 <= stage_idx < self.num_stages:
            raise ValueError(f"stage index {stage_idx!r} is out of range: this pipe has stages 0..{self.num_stages - 1}")
        return self.stage_modules[stage_idx]

    def info(self) -> PipeInfo:
        return self._info

    def forward(self, *args, **kwargs) -> tuple:
        """Run the stages one after another. ValueError (naming the stage, the input, the traced shape
        and the given one) for an input of another dtype or rank, or another size where the trace fixed
        one (`pipeline(dynamic=False)` fixes them all), instead of running a graph specialised to other
        sizes, or sizes that break a condition the traced graph needs (e.g. an even batch for a model
        that reads its rows in pairs), as `step()` does. One difference from `step()`: the floor of 2
        torch.export puts on every symbolic size (it specialises sizes 0 and 1) is not enforced here,
        so a pipe called directly also runs a batch or a sequence of 1."""
        flat = self._info.input_binder.flatten(args, kwargs)
        outputs: list[tuple] = []
        for s, io in enumerate(self._info.stage_io):
            inputs = [flat[i] if src == MODEL_INPUT else outputs[src][i] for src, i in io.input_sources]
            module = self.stage_modules[s]
            key = (s, module.training)   # a traced graph holds the mode it was traced in (pp.stage.modes)
            if key not in self._mode_graphs:
                device = next((t.device for t in module.parameters()), torch.device("cpu"))
                self._mode_graphs[key] = mode_forward(self._info, s, module, device)
            graph = self._mode_graphs[key]
            self._check_inputs(s, inputs, graph)
            out = module(*inputs) if graph is None else call_with_forward(module, module, graph.forward, inputs)
            outputs.append(tuple(out))
        result = pytree.tree_unflatten(list(outputs[-1]), self._info.out_spec)
        return tuple(result) if isinstance(result, (tuple, list)) else (result,)

    def _check_inputs(self, s: int, inputs: list, graph: Any = None) -> None:
        """`graph`: the other mode's ModeGraph the stage runs now (its own specs and conditions), or None."""
        from .contract import check_shapes, graph_input_specs

        module = self.stage_modules[s]
        if not isinstance(module, fx.GraphModule):
            return
        specs = self._specs
        if s not in specs:
            specs[s] = graph_input_specs(module)
        device = next((x.device.type for x in inputs if isinstance(x, torch.Tensor)), "cpu")
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if graph is not None:
            check_shapes(s, graph.specs, inputs, _floors_dropped(graph.guards), autocast_dtype=autocast)
        else:
            check_shapes(s, specs[s], inputs, self._guards(), autocast_dtype=autocast)

    def _guards(self) -> list:
        """The traced graph's shape conditions less the bare floors `s >= 2` of single sizes."""
        if self._call_guards is None:
            self._call_guards = _floors_dropped(self._info.shape_guards)
        return self._call_guards

    def build_stage(self, stage_index: int, device: torch.device | str, group=None):
        """The runtime `PipelineStage` for `stage_index` on this rank (module moved to `device`)."""
        from .runtime import build_stage

        return build_stage(self.get_stage_module(stage_index), stage_index, self._info, device, group)

    def __repr__(self) -> str:
        return f"Pipe(num_stages={self.num_stages})"


def _floors_dropped(guards: list) -> list:
    """Shape conditions less the bare floors `s >= 2` torch.export puts on single sizes."""
    import sympy

    return [g for g in guards
            if not (isinstance(g, sympy.GreaterThan) and isinstance(g.lhs, sympy.Symbol) and g.rhs == 2)]


def _outline(value: Any) -> str:
    """A value's structure in one line: (Tensor, [Tensor, int]), {'mask': Tensor}."""
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_outline, value)) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, list):
        return "[" + ", ".join(map(_outline, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_outline(v)}" for k, v in value.items()) + "}"
    return "Tensor" if isinstance(value, torch.Tensor) or value is _TRACED else type(value).__name__


_TRACED = object()   # a leaf of the traced example in _outline (tensors, as pp.pipeline traces them)
