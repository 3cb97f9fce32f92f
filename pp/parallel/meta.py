"""Models built on the meta device: traced and cut there, and each rank allocates and fills only its
own stages' tensors, from an init function or a state dict, so that no rank ever holds the whole model.

`generator_for(seed, name)` gives each parameter its own random stream, so weights initialised with it
do not depend on how the model is cut or sharded (pp, dp, tp).
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["is_meta", "to_meta", "generator_for", "materialize", "fill"]

InitFn = Callable[[str, torch.Tensor], None]


def is_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of `module` is on the meta device."""
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def to_meta(value: Any) -> Any:
    """`value` (a pytree) with its tensors moved to the meta device, for tracing a meta model."""
    return pytree.tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, value)


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, name): the same numbers for one parameter whatever the layout."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def materialize(module: nn.Module, device: torch.device, memo: dict[int, torch.Tensor] | None = None) -> None:
    """Give every meta parameter and buffer of `module` uninitialised storage on `device`, in place;
    tensors registered under several names (tied weights) stay one tensor. Pass one `memo` dict to the
    calls for several stage modules of a rank: a tensor they share (a tied embedding on stages 0 and
    3 of a V schedule's rank) then stays one tensor across them too, as it is in the model.

    ValueError for a traced constant on the meta device (a tensor the forward created, which cannot
    be re-created): build such a model on a real device."""
    new: dict[int, torch.Tensor] = {} if memo is None else memo
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for leaf, t in list(mod._parameters.items()):
            if t is not None and t.is_meta:
                if id(t) not in new:
                    new[id(t)] = nn.Parameter(torch.empty_like(t, device=device), requires_grad=t.requires_grad)
                mod._parameters[leaf] = new[id(t)]
        for leaf, t in list(mod._buffers.items()):
            if t is not None and t.is_meta:
                name = f"{prefix}.{leaf}" if prefix else leaf
                if name.startswith("_pp_constants"):
                    raise ValueError(f"the traced model has a constant tensor {name!r} on the meta device; "
                                     f"build this model on a real device (its forward creates tensors)")
                if id(t) not in new:
                    new[id(t)] = torch.empty_like(t, device=device)
                mod._buffers[leaf] = new[id(t)]


def fill(module: nn.Module, init_fn: InitFn | None = None, state_dict: Mapping[str, torch.Tensor] | None = None,
         names: Mapping[str, str] | None = None, seen: set[int] | None = None) -> None:
    """Fill the parameters and buffers of `module` (each tensor once, under its first name): copied from
    `state_dict` (whole tensors under the model's names), else `init_fn(name, tensor)` fills it in place.
    `seen` (ids of tensors filled already, updated here) carries over between a rank's stage modules.
    KeyError naming the entry `state_dict` lacks."""
    seen = set() if seen is None else seen
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            if state_dict is not None:
                if name not in state_dict:
                    raise KeyError(f"state_dict has no entry {name!r}, which this rank's stage needs")
                src = state_dict[name]
                if tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"state_dict[{name!r}] has shape {tuple(src.shape)}, the model "
                                     f"{tuple(t.shape)}")
                t.copy_(src)
            elif init_fn is not None:
                init_fn(name, t)
