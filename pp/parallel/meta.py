"""Models built on the meta device: traced and cut there, and each rank allocates and fills only its
own stages' tensors, from an init function or a state dict, so that no rank ever holds the whole model.

`generator_for(seed, name)` gives each parameter its own random stream, so weights initialised with it
do not depend on how the model is cut or sharded (pp, dp, tp).
"""
from __future__ import annotations

import warnings
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


def real_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """{name: tensor} of the parameters and buffers of a model on the meta device that hold values (the
    buffers of a model whose parameters alone are on meta, as `accelerate.init_empty_weights()` builds
    it), under each of their names."""
    return {name: t for name, t, _ in _tensors(module) if not t.is_meta}


_NON_PERSISTENT = ("{name!r} is a non-persistent buffer (computed by the model's constructor, so no state dict holds "
                   "it) and was built on the meta device: build the model with its buffers on a real device "
                   "(parameters alone on meta, e.g. under accelerate.init_empty_weights()), or pass init_fn to "
                   "compute it")


def check_keys(module: nn.Module, state_dict: Mapping[str, torch.Tensor], complete: bool = False,
               kept: Mapping[str, torch.Tensor] | None = None) -> None:
    """ValueError naming the entries of `state_dict` that are none of `module`'s parameter or buffer
    names (aliases of tied weights included): they would fill nothing, silently (a checkpoint saved with
    a `module.` prefix by DDP, another model's); then those of another shape than the model's; then, with
    `complete` (no init function for the rest), the persistent tensors that neither it nor `kept` holds.
    On the whole model, so that every rank refuses alike before any stage is built (a stage's own check
    would stop its rank alone, the others waiting for it)."""
    named = list(_tensors(module))
    known = {name for name, _, _ in named}
    extra = sorted(k for k in state_dict if k not in known)
    if extra:
        shown = ", ".join(map(repr, extra[:5])) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        prefix = {k.split(".", 1)[0] for k in extra if "." in k}
        hint = (f" (each starts with {next(iter(prefix))!r}: a prefix the model's names lack?)"
                if len(prefix) == 1 and len(extra) == len(state_dict) else "")
        raise ValueError(f"state_dict has {len(extra)} entr{'y' if len(extra) == 1 else 'ies'} that the model does "
                         f"not have: {shown}{hint}")
    odd = [f"state_dict[{k!r}] is {'a meta tensor (no values)' if isinstance(v, torch.Tensor) else type(v).__name__}"
           for k, v in state_dict.items() if not isinstance(v, torch.Tensor) or v.is_meta]
    if odd:
        raise ValueError("; ".join(odd[:3]) + ": expected a tensor with values")
    shapes = {name: tuple(t.shape) for name, t, _ in named}
    wrong = [f"state_dict[{k!r}] has shape {tuple(v.shape)}, the model {shapes[k]}" for k, v in state_dict.items()
             if isinstance(v, torch.Tensor) and tuple(v.shape) != shapes[k]]
    if wrong:
        raise ValueError("; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else ""))
    if complete:
        names: dict[int, list[str]] = {}
        for name, t, persistent in named:
            if persistent:
                names.setdefault(id(t), []).append(name)
        have = set(state_dict) | set(kept or ())
        if kept is not None:   # a meta-device model: a constructor-computed buffer no state dict holds
            guessed = [name for name, t, persistent in named if not persistent and t.is_meta and name not in have]
            if guessed:
                raise ValueError(_NON_PERSISTENT.format(name=guessed[0]))
        missing = [n[0] for n in names.values() if not any(a in have for a in n)]
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(f"state_dict lacks {len(missing)} of the model's tensors: {shown} (pass init_fn to "
                             f"initialise what it lacks)")


def fill(module: nn.Module, init_fn: InitFn | None = None, state_dict: Mapping[str, torch.Tensor] | None = None,
         seen: set[int] | None = None, fresh: set[int] | None = None,
         kept: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fill the parameters and buffers of `module` (each tensor once, under its first name): copied from
    `state_dict` (whole tensors under the model's names) where it holds the name, else
    `init_fn(name, tensor)` fills it in place. `seen` (ids of tensors filled already, updated here)
    carries over between a rank's stage modules. `fresh`: ids of the tensors `materialize` gave storage
    (`{id(t) for t in memo.values()}`); a tensor outside it was real before (a buffer of a model whose
    parameters alone were on the meta device, as `accelerate.init_empty_weights()` builds it) and keeps
    its values unless `state_dict` holds it. None: every tensor is fresh. `kept` (`real_tensors` of the
    model before it was traced on the meta device): values for what `state_dict` lacks.

    Raises KeyError, when there is no `init_fn`, naming a parameter or persistent buffer that
    `state_dict` lacks; ValueError for an entry of another shape and, without `init_fn`, for a fresh
    non-persistent buffer (which no state dict holds; the message says how to build the model
    instead). Warns (once per call, naming them) when `init_fn` fills non-persistent buffers: they are
    computed by the model's constructor (rotary frequencies, masks), which a generic init function does
    not reproduce."""
    seen = set() if seen is None else seen
    guessed: list[str] = []
    aliases: dict[int, list[str]] = {}   # each tensor's names (tied weights have several), first name first
    for name, t, _ in _tensors(module):
        aliases.setdefault(id(t), []).append(name)
    with torch.no_grad():
        for name, t, persistent in _tensors(module):
            if id(t) in seen:
                continue
            seen.add(id(t))
            is_fresh = fresh is None or id(t) in fresh
            src = None
            for source in (state_dict, kept):   # a tied weight fills from whichever of its names one holds
                hit = next((n for n in aliases[id(t)] if n in source), None) if source is not None else None
                if hit is not None:
                    name, src = hit, source[hit]
                    break
            if src is not None:
                if tuple(src.shape) != tuple(t.shape):
                    raise ValueError(f"state_dict[{name!r}] has shape {tuple(src.shape)}, the model "
                                     f"{tuple(t.shape)}")
                t.copy_(src)
            elif persistent and state_dict is not None and init_fn is None:
                raise KeyError(f"state_dict has no entry {name!r}, which this rank's stage needs")
            elif not is_fresh:
                continue   # real before: its values are the model's
            elif init_fn is not None:
                init_fn(name, t)
                if not persistent:
                    guessed.append(name)
            else:
                raise ValueError(_NON_PERSISTENT.format(name=name))
    if guessed:
        warnings.warn(f"init_fn filled the non-persistent buffer(s) {', '.join(map(repr, guessed))} of a "
                      f"meta-device model: the model's constructor computes such buffers (rotary frequencies, "
                      f"masks) and no checkpoint holds them, so init_fn must compute them exactly; or build "
                      f"the model with its buffers on a real device (parameters alone on meta, e.g. under "
                      f"accelerate.init_empty_weights()), which pp then keeps", stacklevel=3)


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, persistent) for every parameter and buffer of `module`, duplicates included."""
    out = [(name, p, True) for name, p in module.named_parameters(remove_duplicate=False)]
    for prefix, mod in module.named_modules(remove_duplicate=False):
        for leaf, b in mod._buffers.items():
            if b is not None:
                out.append((f"{prefix}.{leaf}" if prefix else leaf, b, leaf not in mod._non_persistent_buffers_set))
    return out
