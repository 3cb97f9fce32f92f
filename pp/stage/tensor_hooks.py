"""Which backward nodes a manual stage's forward gave tensor hooks (`h.register_hook(fn)` on an
activation, `torch.autograd.graph.register_multi_grad_hook`, a gradient-reversal layer written as a
hook). Autograd keeps such a hook on the node that made the tensor, where Python cannot see it, and runs
it on the gradient arriving there before the node runs. The zero-bubble backward (`pp.stage.backward`)
captures that gradient in I as it arrives (before the hook) and computes the node's weight side in W
from it; at a hooked node it must let the engine run the node instead, so it needs to know the nodes."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

_register_hook = torch.Tensor.register_hook


@contextmanager
def watch_tensor_hooks(hooked: set) -> Iterator[set]:
    """Within the block, `Tensor.register_hook` on a tensor with a `grad_fn` adds that node to `hooked`
    (the hook is registered as always). Costs two attribute writes; not for concurrent threads' forwards."""
    def register_hook(self: torch.Tensor, hook):
        node = self.grad_fn
        if node is not None:
            hooked.add(node)
        return _register_hook(self, hook)

    saved = torch.Tensor.register_hook
    torch.Tensor.register_hook = register_hook
    try:
        yield hooked
    finally:
        torch.Tensor.register_hook = saved
