"""Tensor hooks registered while a model's forward runs (`h.register_hook(fn)` on an activation,
`torch.autograd.graph.register_multi_grad_hook`, a gradient-reversal layer written as a hook). Autograd
keeps a hook on an activation at the node that made it, where Python cannot see it, and runs it on the
gradient arriving there before the node runs. Three places need to know of them: the zero-bubble backward
(`pp.stage.backward`) captures that gradient in I before the hook and must let the engine run a hooked
node in W; a CUDA-graph replay would not run a hook registered in forward at all; a trace
(torch.export) drops it. `hooks_seen(sink)` calls `sink(tensor)` for each one registered within it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

_REGISTER_HOOK = torch.Tensor.register_hook
_sinks: list[Callable[[torch.Tensor], None]] = []


def _register_hook(self: torch.Tensor, hook):
    for sink in _sinks:
        sink(self)
    return _REGISTER_HOOK(self, hook)


@contextmanager
def hooks_seen(sink: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Within the block, each `Tensor.register_hook` call (the hook registered as always) first calls
    `sink(tensor)`; blocks nest. Patches `torch.Tensor.register_hook` while any is open (two attribute
    writes); not for forwards running concurrently in other threads."""
    _sinks.append(sink)
    torch.Tensor.register_hook = _register_hook
    try:
        yield
    finally:
        _sinks.remove(sink)
        if not _sinks:
            torch.Tensor.register_hook = _REGISTER_HOOK
