"""Train and eval mode for traced stages.

torch.export bakes the model's mode into the graph: dropout draws masks or not, batch norm uses the
batch's statistics and updates its running ones or reads them. `stage.submod.eval()` cannot change a
traced graph, so a stage traced in train mode and run after `.eval()` would keep dropping activations
(silently: torch.distributed.pipelining does so). pp records the mode each pipe was traced in; when a
stage's module is switched to eval mode, the model is traced once more in eval mode with the same cuts
and the stage runs that graph (on its own parameters and buffers, read by name) for as long as its module
stays in eval mode. Where the two traces give the same stage graph nothing changes. A stage traced in
eval mode and switched to train mode is refused: training wants the graph that recomputation, compiling
and CUDA graphs were set up on.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn


class ModeTraces:
    """How to trace the pipe's model again in the other mode, and that trace once made.

    `retrace(model, training)` returns the stage modules, stage wiring and shape conditions of `model`
    traced in that mode with the cuts of the first trace. The model is traced again as it is while the
    caller still holds it (it is held weakly: its stages may outlive it), else a copy of its structure on
    the meta device made now (no weights: tracing reads shapes only)."""

    def __init__(self, module: nn.Module, retrace: Callable[[nn.Module, bool], Any], codes: list[str],
                 training: bool) -> None:
        self._real = weakref.ref(module)    # traced again as it is while the caller keeps it
        self._copy = meta_copy(module)     # else its structure on the meta device
        # the device the model was traced on: a copy traced there takes the same device-dependent branches
        self._device = next((t.device for t in (*module.parameters(), *module.buffers()) if not t.is_meta), None)
        # a trace of the copy matches the first trace node for node only where the copy is the model
        # itself (a model on the meta device already, as pp.run builds them)
        self._copy_is_model = self._copy is module
        self._name = type(module).__name__
        self._retrace = retrace
        self.codes = codes             # each stage graph's code as first traced, before any rewriting
        self.training = training       # the mode of the first trace
        self._other: Any = None   # (stage modules, stage io, shape guards, codes) of the other mode, once made

    def other(self) -> Any:
        """(stage modules, stage io, shape guards, codes to compare with) of the other mode's trace. The
        codes are the first trace's where the model itself was traced again; for a meta copy they are
        the copy's own trace in the first mode (its layout, strides and clones, may differ from the real
        model's, so only a trace of the copy in both modes tells what the mode changes)."""
        if isinstance(self._other, Exception):   # tried once already: tracing again would fail alike
            raise self._other
        if self._other is None:
            real = self._real()
            module = real if real is not None else self._copy
            exact = real is not None or self._copy_is_model
            if module is None:
                self._other = _Gone(f"the {self._name} these stages were traced from is gone, and it could not "
                                    f"be copied, so they cannot be traced in "
                                    f"{'train' if not self.training else 'eval'} mode; keep the model alive "
                                    f"while switching the stages' mode")
                raise self._other
            if not exact and self._device is not None:
                # on the device the model was traced on, not meta: models choose ops by device type
                # (Mixtral's histc takes float on cpu, int elsewhere); storage for the length of a trace
                module = _copy_on(module, self._device)
            modes = {m: m.training for m in module.modules()}   # the caller's, submodules' included
            try:
                module.train(not self.training)
                other = self._retrace(module, not self.training)
                codes = self.codes
                if not exact:
                    module.train(self.training)
                    codes = [graph_code(gm) for gm in self._retrace(module, self.training)[0]]
                self._other = (*other, codes)
            except Exception as e:
                self._other = e
                raise
            finally:
                for m, training in modes.items():
                    m.training = training
        return self._other


class _Gone(RuntimeError):
    """The model to trace again is gone (nothing else to suggest)."""


def meta_copy(module: nn.Module) -> nn.Module | None:
    """`module` with every parameter, buffer and tensor attribute on the meta device (no data copied),
    or None where it cannot be deep-copied."""
    if all(t.is_meta for t in (*module.parameters(), *module.buffers())):
        return module
    try:
        return _copy_on(module, torch.device("meta"))
    except Exception:   # a module holding something that cannot be copied (a lock, a handle)
        return None


def _copy_on(module: nn.Module, device: torch.device) -> nn.Module:
    """A deep copy of `module` whose parameters, buffers and tensor attributes are new, uninitialised
    tensors on `device` (meta: no storage; tracing reads shapes, dtypes and devices only)."""
    memo: dict[int, Any] = {}
    for t in (*module.parameters(), *module.buffers()):
        empty = torch.empty_like(t, device=device)
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    for m in module.modules():   # plain tensor attributes too, or the copy would mix devices
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = torch.empty_like(value, device=device)
    return copy.deepcopy(module, memo)


def mode_forward(info: Any, i: int, module: nn.Module, device: torch.device) -> ModeGraph | None:
    """The forward stage `i` of a pipe (`info`: its PipeInfo) runs in its module's current mode: None
    where that is the graph it was built with (the mode it was traced in, or a mode both traces agree
    on), else the other mode's graph bound to `module` (the stage's GraphModule) so that it reads its
    parameters and buffers by name, its factory ops on `device` (the stage's). Raises ValueError where
    the modes cannot be switched (see the module docstring)."""
    traces: ModeTraces | None = getattr(info, "mode_traces", None)
    if traces is None or module.training == traces.training:
        return None
    what = "train" if module.training else "eval"
    try:
        modules, stage_io, guards, codes = traces.other()
    except _Gone:
        raise
    except Exception as e:   # a model that traced once may still fail as a meta copy or in the other mode
        root = e
        while root.__cause__ is not None:   # torch's own error, not pp's advice for a first trace
            root = root.__cause__
        why = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0][:300]}"
        if module.training or mode_dependent(module):
            raise ValueError(f"stage {i} runs in {what} mode, but the model could not be traced in that mode "
                             f"({why}), and its graph has ops that depend on the mode (dropout, batch norm): "
                             f"trace the model in {what} mode for this") from None
        warnings.warn(f"stage {i} runs in {what} mode, but the model could not be traced in that mode ({why}); "
                      f"its graph has no dropout or batch-norm op, so it runs as traced", stacklevel=2)
        return None
    other = modules[i]
    if graph_code(other) == codes[i]:
        return None
    if module.training:
        raise ValueError(f"stage {i} was traced from a model in eval mode, and its graph differs in train mode "
                         f"(dropout, batch norm, or code that reads self.training): stage.submod.train() cannot "
                         f"change a traced graph; call model.train() before pp.pipeline (or pp.parallelize) to "
                         f"train it")
    if getattr(module, "tp_shards", None):
        raise ValueError(f"stage {i} is tensor-parallel and its graph differs in {what} mode (dropout, batch "
                         f"norm, or code that reads self.training): its tensor-parallel rewrite is not redone for "
                         f"the {what}-mode graph; trace the model in {what} mode for this")
    mine = info.stage_io[i]
    if (stage_io[i].input_sources, stage_io[i].output_consumers) != (mine.input_sources, mine.output_consumers):
        raise ValueError(f"stage {i} takes or sends other values in {what} mode than in the mode it was traced "
                         f"in, so it cannot switch: trace the model in {what} mode for this")
    for node in other.graph.nodes:
        if node.op == "get_attr" and not _has_attr(module, node.target):
            raise ValueError(f"stage {i}'s {what}-mode graph reads {node.target!r}, which the stage does not "
                             f"hold; trace the model in {what} mode for this")
    retarget_devices(other, device)
    code = type(other).forward
    from .contract import graph_input_specs
    return ModeGraph(lambda *args: code(module, *args), graph_input_specs(other), guards)


@dataclass
class ModeGraph:
    """A stage's graph for the mode other than the traced one: its forward (bound to the stage module),
    the InputSpecs of its inputs and its shape conditions (a graph traced in another mode may fix sizes
    the first left free), which the stage checks its inputs against while in that mode."""

    forward: Callable
    specs: list
    guards: list


def retarget_devices(gm: fx.GraphModule, device: torch.device) -> None:
    """Rewrite the devices a traced graph baked into its factory ops (arange, full, ...: the device it
    was traced on, meta for a meta model) to `device`."""
    changed = False
    for node in gm.graph.nodes:
        dev = node.kwargs.get("device") if node.op == "call_function" else None
        if isinstance(dev, torch.device) and dev != device:
            node.update_kwarg("device", device)
            changed = True
    if changed:
        gm.recompile()


def call_with_forward(outer: nn.Module, inner: nn.Module, forward: Callable, inputs: list) -> Any:
    """Call `outer` (the stage module, or a wrapper of it such as DDP, so that its hooks run: FSDP's
    unsharding among them) with `forward` standing in for `inner`'s own forward."""
    had = inner.__dict__.get("forward")
    inner.forward = forward
    try:
        return outer(*inputs)
    finally:
        if had is None:
            del inner.forward
        else:
            inner.forward = had


def _has_attr(module: nn.Module, target: str) -> bool:
    obj: Any = module
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


# random draws: dropout and what it lowers to, and noise models add in training only (a router's jitter)
_RANDOM = ("dropout", "bernoulli", "uniform", "normal", "rand", "rrelu", "multinomial", "exponential")


def mode_dependent(module: nn.Module) -> bool:
    """Whether a traced stage (regions of it included) has an op whose result depends on train/eval mode
    as traced in train mode: a random draw (dropout, noise) or batch norm on batch statistics."""
    for gm in module.modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = str(node.target)
            if any(w in name for w in _RANDOM) or "batch_norm_legit_functional" in name or (
                    "native_batch_norm" in name and "no_training" not in name):
                return True
            if "scaled_dot_product" in name and len(node.args) > 4 and node.args[4]:
                return True
    return False


def graph_code(gm: nn.Module) -> str:
    """A stage graph's nodes as text, devices left out (a meta copy traces on meta) and values named by
    position (`v3`), not by the names tracing gave them: those number ops over the whole model, so a
    dropout dropped in eval mode renames the inputs of every later stage (`getitem` and `clone` for one
    tensor) though their graphs are the same. "" for a module that is not a graph."""
    if not isinstance(gm, fx.GraphModule):
        return ""
    names = {n: f"v{i}" for i, n in enumerate(gm.graph.nodes)}
    lines = []
    for n in gm.graph.nodes:
        target = names[n] if n.op == "placeholder" else n.target
        args = fx.node.map_arg(n.args, names.__getitem__)
        kwargs = {k: ("device" if k == "device" else v) for k, v in fx.node.map_arg(n.kwargs, names.__getitem__).items()}
        lines.append(f"{n.op} {names[n]} {target} {args} {kwargs}")
    return "\n".join(lines)
