"""Activation checkpointing of pipeline stages: `none`, `selective` or `full` recompute per block.

A block is one child of the repeated container the splitter cuts (`blocks.3` of a GPT): in a traced
stage, the run of graph nodes whose module stack names that child becomes one region, called through
checkpoint; in a manual stage, each child of the stage's largest ModuleList/Sequential is wrapped.
`full` keeps only each region's inputs and recomputes the rest in backward; `selective` also keeps the
outputs of matmuls and attention (torch's selective-checkpoint contexts with `selective_policy`) and
recomputes only the cheap element-wise ops. Both give the gradients of `none` bit for bit.

Schedules with a full backward (B) use `torch.utils.checkpoint(use_reentrant=False)`. It recomputes
once per autograd call, and the zero-bubble I/W split makes two (and W reads saved tensors again), so
stages of split-backward schedules use `_checkpoint_once` instead: the same saved-tensor hooks, but the
region is recomputed once per microbatch and each recomputed tensor lives as long as the graph node
that saved it (torch's `GraphExecGroup` cannot serve here: it forbids W's second read of a tensor).
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["MODES", "check_mode", "selective_policy", "apply_checkpointing", "Checkpointed", "regions"]

MODES = ("none", "selective", "full")

_aten = torch.ops.aten
# Ops whose outputs `selective` keeps: matmuls and attention (the expensive ones to recompute).
_SAVE = {getattr(_aten, n).default for n in ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm") if hasattr(_aten, n)}
_SAVE |= {getattr(_aten, n).default for n in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward", "_efficient_attention_forward") if hasattr(_aten, n)}
# Tensor-parallel collectives inside a block: `selective` keeps their results rather than communicate again.
_C10D = getattr(torch.ops, "_c10d_functional", None)
_SAVE |= {getattr(_C10D, n).default for n in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor",
                                              "wait_tensor") if _C10D is not None and hasattr(_C10D, n)}


def check_mode(mode: object, key: str = "activation_checkpointing") -> str:
    """`mode` if it is one of `MODES` (in any case, as the config takes it: "Full" is "full"), else
    ValueError naming `key` and the value."""
    if isinstance(mode, str) and mode not in MODES and mode.lower() in MODES:
        return mode.lower()
    if mode not in MODES:
        raise ValueError(f"{key}={mode!r} is not a checkpointing mode pp knows; expected one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def selective_policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the outputs of matmuls, attention and tensor-parallel collectives; recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if func in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _contexts(mode: str) -> Callable | None:
    return functools.partial(create_selective_checkpoint_contexts, selective_policy) if mode == "selective" else None


_capturing = [False]   # inside a CUDA-graph capture (pp.stage.graphs): random-number state is not readable


class capturing:
    """While a stage is captured as CUDA graphs: checkpointed regions neither save nor restore the
    random-number state (reading it is refused during capture; the graphs code leaves a stage that draws
    random numbers inside checkpointed blocks eager, so no recompute depends on it)."""

    def __enter__(self) -> None:
        self._was = _capturing[0]
        _capturing[0] = True

    def __exit__(self, *exc: object) -> None:
        _capturing[0] = self._was


class Checkpointed:
    """`fn` called through activation checkpointing (`mode` full or selective). `once=True` recomputes
    once per forward however many backward calls read it (the I/W split); `runs` counts the calls of
    `fn`, forward and recompute, for tests and benchmarks."""

    def __init__(self, fn: Callable, mode: str, once: bool = False) -> None:
        self.fn, self.mode, self.once, self.runs = fn, check_mode(mode), once, 0

    def _body(self, *args: Any, **kwargs: Any) -> Any:
        self.runs += 1
        return self.fn(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.mode == "none" or not torch.is_grad_enabled():
            return self._body(*args, **kwargs)
        if self.once:
            return _checkpoint_once(self._body, args, kwargs, _contexts(self.mode))
        ctx = _contexts(self.mode)
        extra = {"context_fn": ctx} if ctx is not None else {}
        return checkpoint(self._body, *args, use_reentrant=False, preserve_rng_state=not _capturing[0],
                          **extra, **kwargs)


class _Frame:
    """One checkpointed call: what recomputing it needs, and the recomputed saved tensors."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, recompute_ctx: Any) -> None:
        self.fn, self.args, self.kwargs, self.recompute_ctx = fn, args, kwargs, recompute_ctx
        self.devices = [] if _capturing[0] else sorted(
            {a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"}, key=str)
        self.cpu_rng = None if _capturing[0] else torch.get_rng_state()
        self.dev_rng = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.autocast = [(t, torch.get_autocast_dtype(t)) for t in ("cpu", "cuda")
                         if torch.is_autocast_enabled(t)]
        self.count = 0
        self.saved: list | None = None

    def recompute(self) -> None:
        saved: list = []

        def pack(x: torch.Tensor) -> None:
            saved.append(x.detach())

        def unpack(_: None) -> torch.Tensor:
            raise RuntimeError("a recomputed region's saved tensor was read during its own recompute")

        args = tuple(_detached(a) for a in self.args)
        rng = torch.random.fork_rng(devices=self.devices) if self.cpu_rng is not None else _null()
        with rng, torch.enable_grad():
            if self.cpu_rng is not None:
                torch.set_rng_state(self.cpu_rng)
            for d, state in zip(self.devices, self.dev_rng):
                torch.cuda.set_rng_state(state, d)
            with _autocast(self.autocast), torch.autograd.graph.saved_tensors_hooks(pack, unpack), \
                    (self.recompute_ctx if self.recompute_ctx is not None else _null()):
                self.fn(*args, **self.kwargs)
        if len(saved) != self.count:
            raise RuntimeError(f"activation checkpointing: the recompute saved {len(saved)} tensors, the "
                               f"forward {self.count}; the region is not deterministic")
        self.saved = saved
        self.args = self.kwargs = None  # type: ignore[assignment]


def _detached(a: Any) -> Any:
    """`a` cut from the forward's graph for the recompute, of the same type: a parameter stays an
    nn.Parameter (a compiled region guards on its inputs' types; a plain tensor there would compile a
    second graph whose saved tensors do not line up with the forward's)."""
    if not isinstance(a, torch.Tensor):
        return a
    if type(a) is nn.Parameter:
        return nn.Parameter(a.detach(), requires_grad=a.requires_grad)
    return a.detach().requires_grad_(a.requires_grad)


def _checkpoint_once(fn: Callable, args: tuple, kwargs: dict, context_fn: Callable | None) -> Any:
    fwd_ctx, recompute_ctx = context_fn() if context_fn is not None else (None, None)
    frame = _Frame(fn, args, kwargs, recompute_ctx)

    def pack(x: torch.Tensor) -> tuple:
        frame.count += 1
        return frame, frame.count - 1

    def unpack(holder: tuple) -> torch.Tensor:
        fr, i = holder
        if fr.saved is None:
            fr.recompute()
        return fr.saved[i]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), (fwd_ctx if fwd_ctx is not None else _null()):
        return fn(*args, **kwargs)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _autocast:
    """Re-enter the autocast settings a forward ran under (a list of (device type, dtype))."""

    def __init__(self, settings: list) -> None:
        self.ctxs = [torch.autocast(t, dtype=d) for t, d in settings]

    def __enter__(self) -> None:
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc: object) -> None:
        for c in reversed(self.ctxs):
            c.__exit__(*exc)


# ------------------------------------------------------------------------------- applying it
class _Region(nn.Module):
    """A block's part of a traced stage graph, called through checkpointing (no parameters of its own:
    they come in as inputs, so the stage's parameter names do not change)."""

    def __init__(self, body: fx.GraphModule, mode: str, once: bool) -> None:
        super().__init__()
        self.body = body
        self.call = Checkpointed(body, mode, once)

    def forward(self, *args: Any) -> Any:
        return self.call(*args)


def apply_checkpointing(module: nn.Module, mode: str, once: bool = False) -> list[Checkpointed]:
    """Make each block of stage `module` recompute in backward (in place); return the wrappers.

    A traced stage (fx.GraphModule) gets one region per block; a manual stage wraps the forward of each
    child of its largest ModuleList/Sequential (or the whole module when it has none). `once`: recompute
    once per microbatch for schedules that split the backward into I and W."""
    mode = check_mode(mode)
    if mode == "none":
        return []
    if regions(module):
        raise ValueError("the stage module is checkpointed already (apply_checkpointing ran on it before); "
                         "trace or build the model afresh")
    if isinstance(module, fx.GraphModule) and any(n.meta.get("nn_module_stack") for n in module.graph.nodes):
        return _rewrite_graph(module, mode, once)
    wrapped = []
    for child in manual_blocks(module):
        wrapper = Checkpointed(child.forward, mode, once)
        child.forward = wrapper  # an instance attribute: names and parameters stay as they are
        wrapped.append(wrapper)
    return wrapped


def manual_blocks(module: nn.Module) -> list[nn.Module]:
    """The blocks of a manual stage: the children of its largest ModuleList/Sequential, or the whole
    module when it has none with more than one child."""
    container = max((m for m in module.modules() if isinstance(m, (nn.ModuleList, nn.Sequential))),
                    key=len, default=None)
    return list(container) if container is not None and len(container) > 1 else [module]


def regions(module: nn.Module) -> list[Checkpointed]:
    """The checkpointed regions `apply_checkpointing` made in `module`."""
    found = [m.call for m in module.modules() if isinstance(m, _Region)]
    found += [m.forward for m in module.modules() if isinstance(m.__dict__.get("forward"), Checkpointed)]
    return found


def _block_of(node: fx.Node) -> str | None:
    """The repeated layer `node` belongs to: the outermost module on its stack whose name ends in an index."""
    for fqn, _ in (node.meta.get("nn_module_stack") or {}).values():
        if fqn and fqn.rsplit(".", 1)[-1].isdigit():
            return fqn
    return None


def _rewrite_graph(gm: fx.GraphModule, mode: str, once: bool) -> list[Checkpointed]:
    return [r.call for r in outline_blocks(gm, lambda body: _Region(body, mode, once), "_pp_ac_")]


def outline_blocks(gm: fx.GraphModule, make: Callable[[fx.GraphModule], nn.Module], prefix: str) -> list:
    """Move each block's run of nodes in traced stage `gm` into a submodule `make(body)` named
    prefix + index (body: an fx.GraphModule taking the run's inputs, parameters included, and returning
    the values used after it), called where the run ended; return the submodules made."""
    runs: list[list[fx.Node]] = []
    label: dict[fx.Node, str | None] = {}
    current: str | None = None
    for node in gm.graph.nodes:
        if node.op != "call_function":
            if node.op != "get_attr":
                current = None
            continue
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        block = label.get(src) if node.target is operator.getitem and src in label else _block_of(node)
        label[node] = block
        if block is None or node.target is _aten.copy_.default:
            current = None
            continue
        if block != current:
            runs.append([])
            current = block
        runs[-1].append(node)
    made = []
    for i, run in enumerate(runs):
        made.append(_outline(gm, run, f"{prefix}{i}", make))
    gm.graph.lint()
    gm.recompile()
    return made


def _outline(gm: fx.GraphModule, run: list[fx.Node], name: str, make: Callable) -> nn.Module:
    """Move the nodes of `run` into a region submodule `name`, called where the run ended."""
    inside = set(run)
    inputs: list[fx.Node] = []
    for n in run:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    outputs = [n for n in run if any(u not in inside for u in n.users)]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = g.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in run:
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[o] for o in outputs))
    region = make(fx.GraphModule(nn.Module(), g, class_name="BlockRegion"))
    gm.add_submodule(name, region)
    with gm.graph.inserting_after(run[-1]):
        call = gm.graph.call_module(name, tuple(inputs))
    with gm.graph.inserting_after(call):
        for i, o in enumerate(outputs):
            got = gm.graph.call_function(operator.getitem, (call, i))
            got.meta = dict(o.meta)
            o.replace_all_uses_with(got, delete_user_cb=lambda u: u not in inside)
    for n in reversed(run):
        gm.graph.erase_node(n)
    return region
