"""`shard_stage_module`: tensor parallelism for a trainable module (a pipeline stage) in place of an
ExportedProgram. Parameters keep their names; the inserted collectives are differentiable."""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

import torch
from torch import fx, nn

from pp.comms.collectives import GroupLike, group_name
from pp.stage.export_guards import refusing_custom_backward
from pp.stage.trace import PipelineTraceError
from pp.tp.emit import AutogradEmitter
from pp.tp.rewrite import find_planned_params, rewrite_graph
from pp.tp.styles import normalize_plan
from pp.tp.layout import ParamShard
from pp.tp.transform import check_rank, param_shard, shard_param, target_device

__all__ = ["shard_stage_module"]


def shard_stage_module(
    module: nn.Module,
    example_args: Optional[tuple],
    rank: int,
    world_size: int,
    device_type: str,
    parallel_strategies: Mapping[str, Any],
    group: GroupLike = None,
) -> fx.GraphModule:
    """Return a tensor-parallel copy of `module` for this `rank` of `group` (default: world).

    An `fx.GraphModule` with parameters as `get_attr` nodes (the splitter's stages, or
    `ExportedProgram.module()`) is rewritten directly; `example_args` (one microbatch) refresh the
    nodes' shapes, and may be None if every node already has `meta["val"]`. Any other module is first
    exported with `example_args`. Planned weights become this rank's shards under the same names
    (aliases too); other parameters and buffers are shared with `module` unless they had to move to
    `device_type`. Forward and backward match the unsharded module's. Plan entries for modules that
    are not in `module` are skipped (a stage gets the whole model's plan), unless none is there.
    The result's `tp_shards` maps every sharded parameter name (aliases too) to its
    `pp.tp.layout.ParamShard`, which `gather_shard`/`take_shard` read to go between full and local
    tensors (checkpoints, gradient checks).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if example_args is not None and not isinstance(example_args, tuple):
        raise TypeError(f"example_args must be a tuple of inputs or None, got {type(example_args).__name__}")
    check_rank(rank, world_size, group)
    device = target_device(device_type)
    plans = normalize_plan(parallel_strategies)

    if isinstance(module, fx.GraphModule):
        gm = _copy_sharing_tensors(module)
        if example_args is not None:
            _fill_values(gm, example_args)
    else:
        if example_args is None:
            raise ValueError(f"example_args are needed to export {type(module).__name__}; pass one "
                             f"microbatch of inputs")
        with refusing_custom_backward(module, PipelineTraceError):
            gm = torch.export.export(module, example_args, strict=False).module()

    param_names = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    params = find_planned_params(
        gm.graph, lambda n: n.target if n.op == "get_attr" and n.target in param_names else None, plans,
        require_all=False)
    done: set[str] = set()
    cuts: dict[int, ParamShard] = {}
    for node, p in params.items():
        if node.target not in done:
            old = gm.get_parameter(node.target)
            new = shard_param(node.target, old, p, rank, world_size)
            _replace_tensor(gm, old, new)
            if new is not old:
                cuts[id(new)] = param_shard(p, old.shape)
            done.add(node.target)
    rewrite_graph(gm.graph, params, AutogradEmitter(group_name(group), world_size, rank))
    gm.graph.lint()
    gm.recompile()
    names = {name: cuts[id(t)] for name, t in gm.named_parameters(remove_duplicate=False) if id(t) in cuts}
    _move_tensors(gm, device)
    gm.tp_shards = names
    return gm


def _copy_sharing_tensors(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of the module structure and graph whose parameters and buffers are the same objects."""
    memo: dict[int, Any] = {id(t): t for _, t in _named_tensors(module)}
    return copy.deepcopy(module, memo)


def _fill_values(gm: fx.GraphModule, example_args: tuple) -> None:
    """Set every node's `meta["val"]` to a fake of its value for `example_args` (the full shapes)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_args)


def _replace_tensor(root: nn.Module, old: torch.Tensor, new: torch.Tensor) -> None:
    """Point every name (aliases included) under which `root` holds `old` at `new`."""
    for name, t in _named_tensors(root):
        if t is old:
            owner, _, leaf = name.rpartition(".")
            mod = root.get_submodule(owner)
            if isinstance(new, nn.Parameter):
                mod._parameters[leaf] = new
            else:
                mod._buffers[leaf] = new


def _move_tensors(root: nn.Module, device: torch.device) -> None:
    """Move tensors not on `device` to new ones there, leaving the originals (shared) untouched."""
    tensors = {id(t): t for _, t in _named_tensors(root)}
    for t in tensors.values():
        if t.device != device:
            moved = t.detach().to(device)
            if isinstance(t, nn.Parameter):
                moved = nn.Parameter(moved, requires_grad=t.requires_grad)
            _replace_tensor(root, t, moved)


def _named_tensors(root: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every (name, parameter or buffer) of `root`, aliases included."""
    return (list(root.named_parameters(remove_duplicate=False))
            + list(root.named_buffers(remove_duplicate=False)))
