"""ZeRO 3's whole parameters between steps: their storage is freed (shapes kept), so reading one would
read freed memory (a segfault or garbage, no error). While released, a parameter's class is swapped for
a subclass whose `__torch_function__` lets metadata through (shape, dtype, device, requires_grad, grad,
hooks) and refuses everything that reads values with one sentence saying where the values are.
This is FSDP2's contract too (its parameters between steps are shards, not whole tensors); the class is
swapped back before the step gathers them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["release_class", "restore_class", "is_released"]

# what needs no values: metadata, gradient and hook bookkeeping (getters and setters go by their name)
_ALLOWED = frozenset({
    "shape", "size", "dim", "ndim", "numel", "nelement", "dtype", "device", "layout", "requires_grad",
    "requires_grad_", "is_leaf", "grad", "grad_fn", "_version", "is_cuda", "is_cpu", "is_meta",
    "is_floating_point", "is_complex", "is_sparse", "element_size", "itemsize", "names", "stride",
    "is_contiguous", "storage_offset", "register_hook", "register_post_accumulate_grad_hook", "_backward_hooks",
    "_post_accumulate_grad_hooks", "__hash__", "retains_grad", "_is_view",
    "untyped_storage",   # its size is 0 while released: how tests and users see that it is
})


def _name_of(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__", "__delete__"):   # a property: named by its descriptor
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _Released:
    """Mixin of a released parameter's class (see the module docstring)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = _name_of(func)
        if name in _ALLOWED:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        released = [a for a in args if isinstance(a, _Released)]
        _refuse(name, released[0] if released else None)

    def __repr__(self) -> str:
        return (f"Parameter({getattr(self, '_pp_name', '')!r}, shape {tuple(self.shape)}, {self.dtype}: "
                f"released between steps at zero 3; read it with ParallelModel.state_dict())")

    def __deepcopy__(self, memo):
        _refuse("deepcopy", self)


def _refuse(what: str, param: Any) -> None:
    name = getattr(param, "_pp_name", None)
    raise RuntimeError(
        f"{what} of parameter {name or '?'!r}: at zero 3 the whole parameters hold no values between steps "
        f"(each data-parallel rank keeps only its master shard); read them with ParallelModel.state_dict() "
        f"(whole tensors, collective over the ranks) or the master shards (optimizer_params())")


_CLASSES: dict[type, type] = {}


def release_class(p: nn.Parameter, name: str) -> None:
    """Mark `p` (whose storage is being freed) as released: value reads raise a clear RuntimeError."""
    cls = type(p)
    if issubclass(cls, _Released):
        return
    sub = _CLASSES.get(cls)
    if sub is None:
        sub = _CLASSES[cls] = type(f"Released{cls.__name__}", (_Released, cls), {})
    p._pp_name = name
    p._pp_class = cls
    p.__class__ = sub


def restore_class(p: nn.Parameter) -> None:
    """Undo `release_class` (before the storage is allocated again)."""
    if isinstance(p, _Released):
        p.__class__ = p._pp_class


def is_released(p: torch.Tensor) -> bool:
    return isinstance(p, _Released)
