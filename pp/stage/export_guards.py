"""Backward code a model brings itself, which torch.export drops without a word: it records only the
forward's operations, so a traced stage's backward is the autograd of those. Where the model's own
backward differs (a straight-through estimator, gradient reversal, a gradient-scaling hook), the
stages' gradients would silently be other than the unsplit model's; `pp.pipeline` refuses such a model
instead, naming what it found and where. Found: Python autograd Functions other than torch's own
(their forward is inlined) and torch's reentrant checkpointing (its region is traced without gradients),
`Tensor.register_hook` called in forward, and module backward hooks
(`register_full_backward_hook`, `register_full_backward_pre_hook`, old-style `register_backward_hook`,
and their global forms)."""
from __future__ import annotations

import contextlib
import os
import traceback
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.modules import module as _module

from .tensor_hooks import hooks_seen
from .traced import model_frame

_FUNCTION = torch.autograd.Function


def backward_hooks(module: nn.Module) -> list[str]:
    """What holds module backward hooks that a trace of `module` would drop: its submodules by name
    ('' for the module itself, shown as its class), and 'every module' for global ones."""
    found = [f"module {name or type(module).__name__!r} ({type(m).__name__})" for name, m in module.named_modules()
             if m._backward_hooks or m._backward_pre_hooks]
    if _module._global_backward_hooks or _module._global_backward_pre_hooks:
        found.append("every module (torch.nn.modules.module.register_module_full_backward_hook or "
                     "register_module_full_backward_pre_hook)")
    return found


def _where() -> str:
    frame = model_frame(traceback.extract_stack()[:-2])
    return f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame is not None else ""


@contextlib.contextmanager
def custom_backward_watch() -> Iterator[list[str]]:
    """Within the block (one export), records each Python autograd Function applied (not torch's own,
    whose backward is the autograd of their forward, except reentrant checkpointing) and each `Tensor.register_hook`
    call, with the model's line; yields the list. Patches both for the block only."""
    found: list[str] = []
    apply = _FUNCTION.__dict__["apply"]

    def watched_apply(cls, *args, **kwargs):
        if cls.__qualname__ == "CheckpointFunction" and cls.__module__ == "torch.utils.checkpoint":
            found.append(f"torch.utils.checkpoint(use_reentrant=True){_where()}, whose region the trace runs "
                         f"without gradients (use use_reentrant=False, or train.activation_checkpointing / "
                         f"pp.parallelize(activation_checkpointing=...); a transformers model: "
                         f"gradient_checkpointing_enable(gradient_checkpointing_kwargs={{'use_reentrant': False}}))")
        elif not cls.__module__.startswith("torch."):
            found.append(f"autograd Function {cls.__qualname__}{_where()}")
        return apply.__func__(cls, *args, **kwargs)

    _FUNCTION.apply = classmethod(watched_apply)
    try:
        with hooks_seen(lambda t: found.append(f"a gradient hook (Tensor.register_hook){_where()}")):
            yield found
    finally:
        _FUNCTION.apply = apply


def custom_backward_message(model: str, found: list[str]) -> str:
    """The refusal for a trace of `model` that would drop the backward code in `found` (non-empty)."""
    found = list(dict.fromkeys(found))   # a Function applied in a loop: once
    more = f" (and {len(found) - 1} more: {'; '.join(found[1:4])}{'; ...' if len(found) > 4 else ''})" \
        if len(found) > 1 else ""
    return (f"{model} brings backward code of its own, which torch.export drops: {found[0]}{more}. A traced stage "
            f"computes the autograd of the forward's operations instead, so its gradients would silently differ "
            f"from the model's. Cut the model by hand and wrap each piece in pp.PipelineStage(submodule, "
            f"stage_index, num_stages, device): such stages run the model's own code, its backward included.")


@contextlib.contextmanager
def refusing_custom_backward(module: nn.Module, error: type[Exception]) -> Iterator[None]:
    """Around one torch.export of `module`: raises `error` (one message: what, where, the way out) where
    `module` holds module backward hooks (before the export runs) or its forward applied backward code of
    its own (after; an error of the export itself goes through as it is)."""
    hooks = backward_hooks(module)
    if hooks:
        raise error(custom_backward_message(type(module).__name__, [f"backward hooks on {h}" for h in hooks]))
    with custom_backward_watch() as found:
        yield
    if found:
        raise error(custom_backward_message(type(module).__name__, found))
