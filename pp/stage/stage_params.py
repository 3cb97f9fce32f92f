"""Where each stage's parameters and buffers live: installed under the model's own qualified names,
parameters several stages hold found by identity, unused tensors given to a stage, and parameters
ordered as the model orders them."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

__all__ = ["canonical_names", "place_unused", "shared_params", "order_like", "named_tensors", "attr_name", "install"]


def place_unused(module: nn.Module, stage_modules: list[fx.GraphModule]) -> None:
    """Give each parameter and buffer that no op reads to one stage, so that the stages together still
    hold the whole model (state dicts, checkpoints): the stage holding the tensor registered before it."""
    placed: dict[int, int] = {}  # id(tensor) -> first stage holding it
    held: list[set[str]] = []
    for s, gm in enumerate(stage_modules):
        named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
        held.append({name for name, _ in named})
        for _, t in named:
            placed.setdefault(id(t), s)
    stage = 0
    for prefix, mod in module.named_modules(remove_duplicate=False):
        entries = [(leaf, t, "param") for leaf, t in mod._parameters.items()] + [
            (leaf, t, "buffer_np" if leaf in mod._non_persistent_buffers_set else "buffer")
            for leaf, t in mod._buffers.items()]
        for leaf, tensor, kind in entries:
            if tensor is None:
                continue
            name = f"{prefix}.{leaf}" if prefix else leaf
            stage = placed.setdefault(id(tensor), stage)
            if name not in held[stage]:  # unused, or an unused alias of a tensor placed under another name
                install(stage_modules[stage], name, tensor, kind)
                held[stage].add(name)


def shared_params(module: nn.Module, stage_modules: list[fx.GraphModule]
                   ) -> tuple[dict[str, list[int]], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """({first name: stages holding it}, {first name: (shape, dtype)}) for each parameter that several
    stages hold, found by identity: a tensor is one parameter under every name the model gives it, so
    `shared.weight` on one stage and its aliases `dec.embed.weight`/`head.weight` on another are one."""
    canonical = canonical_names(module)
    first = {id(p): canonical[n] for n, p in module.named_parameters(remove_duplicate=False)}
    holders: dict[str, list[int]] = defaultdict(list)
    metas = {}
    for s, gm in enumerate(stage_modules):
        for name, p in gm.named_parameters():  # each tensor once
            key = first.get(id(p), name)
            holders[key].append(s)
            metas[key] = (tuple(p.shape), p.dtype)
    shared = {name: stages for name, stages in holders.items() if len(stages) > 1}
    return shared, {name: metas[name] for name in shared}


def order_like(module: nn.Module, gm: nn.Module) -> None:
    """Order `gm`'s submodules and parameters as `module` orders them, so that a parameter reached
    under several names is listed first (`named_parameters()`, optimizer state, checkpoints) under the
    model's first name for it on every stage, whatever order the stage's graph read it in."""
    originals = dict(module.named_modules(remove_duplicate=False))
    rank = {name: i for i, name in enumerate(originals)}
    for prefix, mod in list(gm.named_modules(remove_duplicate=False)):
        def position(child: tuple[str, Any], _p: str = prefix) -> int:
            return rank.get(f"{_p}.{child[0]}" if _p else child[0], len(rank))
        mod._modules = dict(sorted(mod._modules.items(), key=position))
        if prefix in originals:
            leaves = {leaf: i for i, leaf in enumerate(originals[prefix]._parameters)}
            mod._parameters = dict(sorted(mod._parameters.items(), key=lambda kv: leaves.get(kv[0], len(leaves))))


def canonical_names(module: nn.Module) -> dict[str, str]:
    """Each parameter name -> the first name the model gives that tensor (tied weights have several)."""
    first: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names[name] = first.setdefault(id(p), name)
    return names


def named_tensors(module: nn.Module, ep) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    tensors.update(dict(module.named_parameters(remove_duplicate=False)))
    tensors.update(dict(module.named_buffers(remove_duplicate=False)))
    for name, value in ep.constants.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
    return tensors


def attr_name(fqn: str, kind: str) -> str:
    return "_pp_constants." + fqn.replace(".", "_") if kind == "const" else fqn


def install(root: nn.Module, path: str, tensor: torch.Tensor, kind: str) -> None:
    *parents, leaf = path.split(".")
    mod = root
    for p in parents:
        if not hasattr(mod, p):
            mod.add_module(p, nn.Module())
        mod = getattr(mod, p)
    if kind == "param":
        mod.register_parameter(leaf, tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor))
    else:
        mod.register_buffer(leaf, tensor, persistent=kind == "buffer")
