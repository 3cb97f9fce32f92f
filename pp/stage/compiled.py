"""Compiled stages: each block of a pipeline stage (or the whole stage) run through `torch.compile`,
forward and backward, with a count of the graphs compiled so that recompiles show.

A block is what activation checkpointing calls one (`pp.parallel.checkpointing`): in a traced stage the
run of graph nodes of one child of the repeated container (moved into a region submodule whose
parameters come in as inputs, so names do not change), in a manual stage each child of its largest
ModuleList/Sequential. The I/W split of zero-bubble schedules treats a compiled region's backward as one
node (`pp.stage.backward`): I runs it once and accumulates its weight gradients at once; W is left the
eager rest. Donated buffers are turned off while compiling for such schedules, because I may keep the
graph alive for the eager split nodes (pytorch/pytorch#161904).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["PER", "CompileCounter", "compile_stage"]

PER = ("block", "stage")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")   # inductor's own CUDA graphs: not inside pp's


class CompileCounter:
    """A dynamo backend that counts the graphs it compiles (`count`) and hands each to `backend`
    (inductor with `mode`, or a backend named as torch.compile takes it), with donated buffers off
    when `keep_graph` (a backward may run while its graph is kept: the I/W split)."""

    def __init__(self, backend: str, mode: str | None, dynamic: bool | None, keep_graph: bool) -> None:
        if backend == "inductor":
            self.inner: Callable = torch._TorchCompileInductorWrapper(mode, None, dynamic)
        else:
            if mode is not None:
                raise ValueError(f"mode={mode!r} applies to the inductor backend only, not {backend!r}")
            from torch._dynamo import lookup_backend
            self.inner = lookup_backend(backend)
        self.keep_graph = keep_graph
        self.count = 0

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        self.count += 1
        with _no_donated_buffers() if self.keep_graph else contextlib.nullcontext():
            return self.inner(gm, example_inputs)


def _no_donated_buffers() -> Any:
    """torch._functorch.config.donated_buffer=False for the compiles inside (a no-op where this torch
    has no such setting), and AOTAutograd's cache off: its entries do not key on that setting, so a graph
    compiled earlier with donated buffers would come back with them."""
    import torch._functorch.config as config
    off = {k: False for k in ("donated_buffer", "enable_autograd_cache") if hasattr(config, k)}
    return config.patch(off) if off else contextlib.nullcontext()


class _CompiledRegion(nn.Module):
    """One block of a traced stage, compiled (parameters come in as inputs, as in checkpoint regions)."""

    def __init__(self, body: fx.GraphModule, wrap: Callable[[Callable], Callable]) -> None:
        super().__init__()
        self.body = body
        self.run = wrap(body.forward)

    def forward(self, *args: Any) -> Any:
        return self.run(*args)


def inner_module(module: nn.Module) -> nn.Module:
    """The user's module inside a torch DDP wrapper (its forward is what gets compiled)."""
    return module.module if type(module).__name__ == "DistributedDataParallel" else module


def compile_stage(module: nn.Module, counter: CompileCounter, per: str | None = None,
                  dynamic: bool | None = None) -> int:
    """Compile stage `module` in place, per block or per stage (`per`); the graphs `counter` compiles.

    `per=None` (the default) compiles the whole stage, or each block where the stage is checkpointed:
    one region per stage launched faster than one per block on 1 and 2 H200s (GPT 16 x 2048, bf16,
    microbatch 2: 77k against 51k tokens/s through pp.run on one GPU; bench/results/
    20261201-h200x1-trainer-phases), since each compiled call costs host time (guards, AOTAutograd's
    wrappers, the block's parameters passed in). Returns the number of compiled regions. Blocks already
    checkpointed (`apply_checkpointing`) get their body compiled inside the checkpoint. ValueError for an
    unknown `per`, for a stage compiled already, and for `per="stage"` on a checkpointed stage.
    """
    from ..parallel.checkpointing import manual_blocks, outline_blocks, regions

    if per is not None and per not in PER:
        raise ValueError(f"per={per!r} is not a compile granularity; expected 'block' or 'stage'")
    if getattr(module, "_pp_compiled", False):
        raise ValueError("the stage module is compiled already (compile ran on it before)")

    def wrap(fn: Callable) -> Callable:
        return torch.compile(fn, backend=counter, dynamic=dynamic)

    checkpointed = regions(module)
    if per is None:
        per = "block" if checkpointed else "stage"
    target = inner_module(module)
    if per == "stage":
        if checkpointed:
            raise ValueError("per='stage' with activation checkpointing: the recompute is not traced into "
                             "a compiled stage; use per='block' (each checkpointed block compiled inside)")
        target.forward = wrap(target.forward)
        made = 1
    elif checkpointed:
        for c in checkpointed:
            c.fn = wrap(c.fn)
        made = len(checkpointed)
    elif isinstance(target, fx.GraphModule):
        made = len(outline_blocks(target, lambda body: _CompiledRegion(body, wrap), "_pp_compiled_"))
        if made == 0:   # no module stack to find blocks by: the whole stage is one region
            target.forward = wrap(target.forward)
            made = 1
    else:
        blocks = manual_blocks(target)
        for child in blocks:
            child.forward = wrap(child.forward)   # an instance attribute: names and parameters stay
        made = len(blocks)
    module._pp_compiled = True
    return made


def check_with_cuda_graphs(mode: str | None) -> None:
    """ValueError where inductor's `mode` captures CUDA graphs itself, which pp's replay cannot hold."""
    if mode in _CUDAGRAPH_MODES:
        raise ValueError(f"compile mode={mode!r} captures CUDA graphs inside inductor, which cannot run inside "
                         f"pp's CUDA-graph replay; use mode=None, 'default' or 'max-autotune-no-cudagraphs'")


def compile_stages(stages: dict, split_backward: bool, mode: str | None = None, per: str | None = None,
                   dynamic: bool | None = None, backend: str = "inductor") -> dict[int, CompileCounter]:
    """Compile each of `stages` ({stage index: PipelineStage}) in place; {stage index: its counter}.

    `split_backward`: the schedule splits backward into I and W (donated buffers off); `per` as in
    `compile_stage` (None: per stage, per block where checkpointed). ValueError for a
    bad `per`, `mode`, `dynamic` or `backend`, a stage compiled already, or a stage with CUDA graphs
    under an inductor mode that captures its own."""
    if mode is not None and not isinstance(mode, str):
        raise TypeError(f"mode must be None or an inductor mode name such as 'max-autotune-no-cudagraphs', "
                        f"got {type(mode).__name__}")
    if dynamic not in (None, True, False):
        raise ValueError(f"dynamic must be None, True or False, got {dynamic!r}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name such as 'inductor', got {type(backend).__name__}")
    if per is not None and per not in PER:
        raise ValueError(f"per={per!r} is not a compile granularity; expected 'block' or 'stage'")
    import torch._inductor   # not imported by `import torch`
    if mode is not None and mode not in torch._inductor.list_mode_options():
        raise ValueError(f"mode={mode!r} is not an inductor mode; expected one of "
                         f"{', '.join(torch._inductor.list_mode_options())}")
    counters = {}
    for i, stage in stages.items():
        if stage.graphs is not None:
            check_with_cuda_graphs(mode)
        counters[i] = CompileCounter(backend, mode, dynamic, keep_graph=split_backward)
        compile_stage(stage.submod, counters[i], per, dynamic)
        stage.compiled = counters[i]
    return counters
