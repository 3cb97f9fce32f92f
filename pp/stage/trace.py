"""Tracing for the splitter: cut markers for `split_spec`, and torch.export with symbolic input sizes
(falling back to the example's fixed sizes where the model only exports so)."""
from __future__ import annotations

import contextlib
import difflib
import io
import logging
import operator
import sys
import warnings
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from .contract import dynamic_shapes
from .export_guards import refusing_custom_backward
from .hf_attention import eager_attention_for_export
from .marker import SplitPoint, pipe_split
from .traced import user_frame, way_out


class PipelineTraceError(RuntimeError):
    """torch.export could not trace the model; the message names the operation and the way out."""


@contextlib.contextmanager
def cuts_by_module(module: nn.Module, split_spec: Mapping[str, SplitPoint]) -> Iterator[dict[str, int]]:
    """Temporarily make the named submodules call pipe_split() before or after themselves; on leaving,
    check that each named submodule ran exactly once, so that every entry made exactly one cut.
    Yields the call counts (reset them before tracing again)."""
    modules = dict(module.named_modules())
    patched: list[tuple[nn.Module, Any]] = []  # (submodule, its own instance-level forward or None)
    calls: dict[str, int] = {name: 0 for name in split_spec}
    try:
        for name, point in split_spec.items():
            if name not in modules or name == "":
                close = difflib.get_close_matches(str(name), [m for m in modules if m], n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"split_spec names submodule {name!r}, which {type(module).__name__} "
                                 f"does not have{hint}")
            if not isinstance(point, SplitPoint):
                raise ValueError(f"split_spec[{name!r}] is {point!r}; expected SplitPoint.BEGINNING or "
                                 f"SplitPoint.END")
            sub = modules[name]
            original = sub.forward

            def wrapped(*args, __f=original, __p=point, __n=name, **kwargs):
                calls[__n] += 1
                if __p is SplitPoint.BEGINNING:
                    pipe_split()
                out = __f(*args, **kwargs)
                if __p is SplitPoint.END:
                    pipe_split()
                return out

            patched.append((sub, sub.__dict__.get("forward")))
            sub.forward = wrapped
        yield calls
        for name, n in calls.items():
            if n == 0:
                raise ValueError(
                    f"split_spec names submodule {name!r}, which {type(module).__name__}.forward never calls, "
                    f"so no cut can go there; name a submodule that forward calls (a ModuleList is never "
                    f"called itself: name one of its children)")
            if n > 1:
                raise ValueError(
                    f"split_spec names submodule {name!r}, which {type(module).__name__}.forward calls {n} "
                    f"times, so it does not mark one place to cut; place pipe_split() in forward instead")
    finally:
        for sub, own_forward in patched:
            if own_forward is None:
                del sub.forward
            else:
                sub.forward = own_forward


def export_model(module: nn.Module, args: tuple, kwargs: dict, restart=lambda: None,
                 dynamic: bool = True) -> torch.export.ExportedProgram:
    """Export with every input dimension symbolic where the model allows it (so the stages take other
    batch sizes and sequence lengths); a model that only exports with fixed sizes is exported so, and
    its stages then take exactly the example's shapes (the input checks say so). `dynamic=False`:
    fixed sizes only. PipelineTraceError where it cannot trace, or where the model brings backward code
    of its own that the trace would drop (`pp.stage.export_guards`)."""
    with refusing_custom_backward(module, PipelineTraceError):
        ep = _export_both_ways(module, args, kwargs, restart, dynamic)
    return ep


def _export_both_ways(module: nn.Module, args: tuple, kwargs: dict, restart,
                      dynamic: bool) -> torch.export.ExportedProgram:
    """`export_model` without its checks: with variable sizes where it can, else at the example's."""
    shapes = dynamic_shapes(module.forward, args, kwargs) if dynamic else None
    fixed_because = None
    if shapes is not None:
        try:
            return _export_with(module, args, kwargs, shapes)
        except Exception as e:  # retried with fixed sizes below; that attempt's error is the one reported
            fixed_because = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            restart()
    try:
        ep = _export_with(module, args, kwargs, None)
        if fixed_because is not None:
            warnings.warn(f"torch.export could not trace {type(module).__name__} with variable sizes "
                          f"({fixed_because[:300]}), so it was traced at the example's sizes: its stages take "
                          f"exactly those shapes", stacklevel=3)
        return ep
    except Exception as e:  # export raises many types; all mean "cannot trace"
        where = user_frame(e)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PipelineTraceError(
            f"torch.export could not trace {type(module).__name__}{where}: {type(e).__name__}: {first}. "
            f"{way_out(str(e))}"
        ) from e


def _fresh(x: Any) -> Any:
    """A copy of an example tensor: torch.export marks the dimensions it made symbolic on the tensors it
    is given, and keeps those marks after it fails, so a later fixed-size export of the same tensors
    would still trace them symbolically."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.detach().clone().requires_grad_(x.requires_grad and x.is_leaf)


def _export_with(module: nn.Module, args: tuple, kwargs: dict, shapes: dict | None) -> torch.export.ExportedProgram:
    args, kwargs = pytree.tree_map(_fresh, (args, kwargs))
    # torch.export prints the partial graph of a model it cannot trace straight to stderr (dozens of
    # lines before pp's one-line reason): what it writes there is kept back, and passed on if it succeeds
    held = io.StringIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch-internal pytree notices
        with _quiet("torch._export.non_strict_utils"), _quiet("torch.fx.experimental.symbolic_shapes"), \
                _quiet("torch._subclasses.fake_tensor", logging.CRITICAL), eager_attention_for_export(module):
            with contextlib.redirect_stderr(held):
                ep = torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=shapes)
            if held.getvalue():
                sys.stderr.write(held.getvalue())
            _detach_no_grad_regions(ep)
            return ep.run_decompositions({})


def _detach_no_grad_regions(ep: torch.export.ExportedProgram) -> None:
    """Make what the model computes under `torch.no_grad()` a constant for autograd, as in eager.

    torch.export keeps such a block as one `wrap_with_set_grad_enabled(False, ...)` node, but
    `run_decompositions` inlines its ops as ordinary ones, so the stages' backward would send gradients
    through values that eager treats as constants (a stop-gradient normaliser: wrong gradients, no
    error), and a buffer updated from them (spectral_norm's power iteration, a running mean) would chain
    each microbatch's graph to the one before. Each of the block's results gets an `aten.detach` that
    survives the decomposition. Edits `ep`'s graph in place."""
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    graph, changed = ep.graph_module.graph, False
    for node in list(graph.nodes):
        if hop is None or node.target is not hop or node.args[0] is not False:
            continue
        for use in list(node.users):
            if use.target is not operator.getitem:
                continue
            with graph.inserting_after(use):
                const = graph.call_function(torch.ops.aten.detach.default, (use,))
            const.meta.update(use.meta)
            use.replace_all_uses_with(const, delete_user_cb=lambda u: u is not const and u.op != "output")
            changed = True
    if changed:
        ep.graph_module.recompile()


@contextlib.contextmanager
def _quiet(logger: str, level: int = logging.ERROR) -> Iterator[None]:
    """Silence one torch logger below `level` while exporting: its notes on specialised sizes, and the
    traceback the fake-tensor logger prints for an op that fails (pp's one line names that error)."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)
