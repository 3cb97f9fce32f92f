"""What the splitter does with a traced program besides cutting it: views made stride-independent, a
returned cache refused, and trace failures explained (the model's own line, the way out for the cause)."""
from __future__ import annotations

import os
import re
import traceback
from typing import Any

import torch
import torch.fx as fx


def model_frame(e: BaseException | list) -> traceback.FrameSummary | None:
    """The innermost frame of `e`'s traceback (or of a list of frames, innermost last) in the model's own
    code: outside torch, pp and Python's standard library and not generated (`<string>`, `<frozen ...>`),
    preferring the user's own files to installed packages such as transformers; None when there is none."""
    import sysconfig

    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)),
            os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep)
    stack = e if isinstance(e, list) else traceback.extract_tb(e.__traceback__)
    frames = [f for f in stack if not os.path.abspath(f.filename).startswith(skip) and not f.filename.startswith("<")]
    own = [f for f in frames if "site-packages" not in f.filename and "dist-packages" not in f.filename]
    return (own or frames or [None])[-1]


def user_frame(e: BaseException | list) -> str:
    """' at file.py:LINE (source)' of `model_frame(e)`, '' when there is none."""
    f = model_frame(e)
    return f" at {os.path.basename(f.filename)}:{f.lineno} ({(f.line or '').strip()})" if f is not None else ""


def way_out(error: str) -> str:
    """The sentence telling the user how to get past a trace failure with this message."""
    if re.search(r"Cache\b|cache_utils", error):
        return ("The model returns a cache object (a transformers model built with use_cache=True): set "
                "use_cache=False in its config (model.config.use_cache = False) or pass use_cache=False to forward.")
    if re.search(r"data-dependent|GuardOnDataDependent", error):
        return ("Its forward branches on a tensor's value: compute both branches and pick with torch.where, use "
                "torch.cond, or cut the model by hand and wrap each piece in "
                "pp.PipelineStage(submodule, stage_index, num_stages, device).")
    if re.search(r"in (the )?output|not a known type|pytree", error):
        return ("Return tensors, or tuples, lists and dicts of them (or register the output class with "
                "torch.utils._pytree.register_pytree_node).")
    return ("To pipeline this model anyway, cut it by hand and wrap each piece in "
            "pp.PipelineStage(submodule, stage_index, num_stages, device).")


STRIDED_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def views_as_reshapes(graph: fx.Graph) -> None:
    """Make every view a reshape. run_decompositions turns a reshape into a view wherever the traced
    strides allow one, but the strides at run time may differ (an attention kernel's output layout on
    another device, a non-contiguous input), and the view then fails. The graph is functional, so a
    reshape (a view where the strides allow, else a copy) computes the same values."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in STRIDED_VIEWS:
            node.target = torch.ops.aten.reshape.default


def cache_in_output(spec: Any) -> str | None:
    """The class name of a key/value cache (transformers' use_cache=True) in a traced output spec, or None:
    such a cache would be shipped between stages every microbatch and never used."""
    stack = [spec]
    while stack:
        node = stack.pop()
        kind = getattr(node, "type", None)
        if isinstance(kind, type) and kind.__name__.endswith("Cache"):
            return kind.__name__
        children = getattr(node, "children", None)
        stack.extend(children() if callable(children) else getattr(node, "children_specs", None) or [])
    return None


def drop_metadata_asserts(graph: fx.Graph) -> None:
    """Erase `aten._assert_tensor_metadata` nodes: torch.export records one per `.to()` call to check
    dtypes it already knows; each stage would pay a host-side call per node per microbatch for nothing."""
    target = torch.ops.aten._assert_tensor_metadata.default
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is target and not node.users:
            graph.erase_node(node)


_FULL = 2**62  # an end at or past this is "to the end" (export writes sys.maxsize)


def drop_identity_views(graph: fx.Graph) -> None:
    """Replace views that return their input unchanged by that input: `aten.slice(x, dim, 0, end)` with
    `end` past any size and step 1 (export writes `x[:, :n]` this way once `n` is a symbolic size equal to
    the dimension's), and `aten.alias`. Each costs a host-side call and an autograd node per microbatch
    on every stage for nothing (an HF Llama layer carries about five). The graph is functional, so the
    input itself computes the same values."""
    slice_op, alias_op = torch.ops.aten.slice.Tensor, torch.ops.aten.alias.default
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        if node.target is slice_op:
            _, _dim, start, end, step = (*node.args, *(None,) * (5 - len(node.args)))[:5]
            start = node.kwargs.get("start", start)
            end = node.kwargs.get("end", end)
            step = node.kwargs.get("step", step)
            if start not in (None, 0) or step not in (None, 1) or not (end is None or (isinstance(end, int) and end >= _FULL)):
                continue
        elif node.target is not alias_op:
            continue
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
