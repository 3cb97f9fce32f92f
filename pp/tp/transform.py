"""`tensor_parallel_transformation`: an ExportedProgram in, this rank's tensor-parallel one out."""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, OutputSpec, TensorArgument

from pp.comms.backend import is_initialized
from pp.comms.collectives import GroupLike, group_name, group_size, resolve_group
from pp.comms.p2p import group_rank
from pp.tp.emit import FunctionalEmitter
from pp.tp.layout import ParamShard, take_shard
from pp.tp.rewrite import PlannedParam, find_planned_params, rewrite_graph
from pp.tp.styles import normalize_plan

__all__ = ["check_rank", "param_shard", "shard_param", "target_device", "tensor_parallel_transformation"]


def tensor_parallel_transformation(
    exported_program: ExportedProgram,
    rank: int,
    world_size: int,
    device_type: str,
    parallel_strategies: Mapping[str, Any],
    group: GroupLike = None,
) -> ExportedProgram:
    """Return `exported_program` rewritten for tensor parallelism on this `rank`.

    Modules named in `parallel_strategies` (FQN -> pp.tp or torch Colwise/RowwiseParallel, an
    instance or the class itself) get their weights really sharded, as DTensor shards them: a size
    that does not divide `world_size` is cut as `torch.chunk` cuts it (5 over 4 ranks: 2, 2, 1, 0);
    `_c10d_functional` collectives + `wait_tensor` over `group` (default: world) keep the result of
    `.module()` equal to the original's on every rank. The program's state
    lives on `device_type` (the current device of that type). Forward only: the inserted collectives
    have no autograd; train with `pp.tp.shard_stage_module`.
    """
    if not isinstance(exported_program, ExportedProgram):
        raise TypeError(f"exported_program must be a torch.export.ExportedProgram, "
                        f"got {type(exported_program).__name__}")
    check_rank(rank, world_size, group)
    device = target_device(device_type)
    plans = normalize_plan(parallel_strategies)
    ep = exported_program

    gm = fx.GraphModule(ep.graph_module, copy.deepcopy(ep.graph))
    to_param = ep.graph_signature.inputs_to_parameters
    params = find_planned_params(gm.graph, lambda n: to_param.get(n.name) if n.op == "placeholder" else None,
                                 plans)
    state_dict = dict(ep.state_dict)
    for node, p in params.items():
        name = to_param[node.name]
        state_dict[name] = shard_param(name, state_dict[name], p, rank, world_size)
    emitter = FunctionalEmitter(group_name(group), world_size, rank)
    rewrite_graph(gm.graph, params, emitter)
    gm.graph.lint()
    gm.recompile()

    _propagate_fake_values(gm, {node: state_dict[to_param[node.name]] for node in params})
    signature = _with_new_outputs(ep.graph_signature, gm.graph)
    out = ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=signature, state_dict=state_dict,
        range_constraints=ep.range_constraints, module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs, constants=ep.constants, verifiers=ep.verifiers,
    )
    if any(t.device != device for t in out.state_dict.values()):
        from torch.export.passes import move_to_device_pass

        out = move_to_device_pass(out, device)
    return out


def check_rank(rank: int, world_size: int, group: GroupLike) -> None:
    """Fail unless `rank`/`world_size` are this process's rank and size in `group`."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if is_initialized():
        pg = resolve_group(group)
        actual = (group_rank(pg), group_size(pg))
        if actual != (rank, world_size):
            raise ValueError(f"rank={rank}, world_size={world_size} do not match the group, where this "
                             f"process is rank {actual[0]} of {actual[1]}")


def target_device(device_type: str) -> torch.device:
    """`device_type`'s current device (cuda -> cuda:<current>, cpu -> cpu)."""
    if not isinstance(device_type, str):
        raise TypeError(f"device_type must be a string like 'cuda' or 'cpu', got {device_type!r}")
    device = torch.device(device_type)
    if device.type == "cpu" or device.index is not None:
        return device
    return torch.device(device.type, torch.get_device_module(device.type).current_device())


def shard_param(name: str, value: torch.Tensor, p: PlannedParam, rank: int, world_size: int) -> torch.Tensor:
    """This rank's block of a planned weight/bias (a row-parallel bias stays whole), cut as
    `torch.chunk` and DTensor cut it: unevenly where the size does not divide (5 over 2: 3 + 2),
    and empty on the last ranks where the group is larger than the size. Raises ValueError only
    for a fused projection (`p.blocks` > 1) whose blocks do not split evenly, since every rank must
    cut its parts of q, k and v alike."""
    shard = param_shard(p, value.shape)
    if shard is None:
        return value
    size = value.shape[shard.dim]
    if shard.blocks > 1 and size % (world_size * shard.blocks) != 0:
        what = "out_features" if shard.dim == 0 else "in_features"
        raise ValueError(f"{p.fqn}: ColwiseParallel splits {what}={size} ({name} of shape "
                         f"{tuple(value.shape)}) in {shard.blocks} fused blocks (its output is split "
                         f"{shard.blocks} ways) over world_size={world_size}, which must divide each "
                         f"block of {size // shard.blocks} so that every rank holds matching parts")
    local = take_shard(value, shard, rank, world_size)
    if isinstance(value, torch.nn.Parameter):
        return torch.nn.Parameter(local, requires_grad=value.requires_grad)
    return local


def param_shard(p: PlannedParam, shape: torch.Size | tuple) -> ParamShard | None:
    """How planned parameter `p` of whole shape `shape` is cut, or None where it stays whole (a
    row-parallel bias)."""
    if p.plan.kind == "row" and p.role == "bias":
        return None
    dim = 0 if p.plan.kind == "col" else 1
    return ParamShard(dim, p.blocks, shape[dim])


def _propagate_fake_values(gm: fx.GraphModule, sharded: dict[fx.Node, torch.Tensor]) -> None:
    """Recompute every node's `meta["val"]` with the sharded parameters' shapes."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    class _Prop(FakeTensorProp):
        # Some torch versions run collectives on fake inputs through a real-kernel fallback, which
        # specialises symbolic sizes (a dynamic batch would become static); their shapes are simple.
        def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
            if target in _COLLECTIVE_SHAPES:
                return _COLLECTIVE_SHAPES[target](*args)
            return super().call_function(target, args, kwargs)

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = _fake_mode(placeholders)
    inputs = []
    for node in placeholders:
        if node in sharded:
            node.meta["val"] = fake_mode.from_tensor(sharded[node], static_shapes=True)
        inputs.append(node.meta["val"])
    # As in export: composite ops decompose in Python on symbolic sizes instead of reading concrete
    # sizes in C++, which would specialise a dynamic batch (torch 2.11 does that for aten.linear).
    from torch._dispatch.python import enable_python_dispatcher

    with enable_python_dispatcher():
        _Prop(gm, fake_mode).propagate_dont_convert_inputs(*inputs)


_F = torch.ops._c10d_functional
_COLLECTIVE_SHAPES = {
    _F.all_reduce.default: lambda x, *_: torch.empty_like(x),
    _F.wait_tensor.default: lambda x: torch.empty_like(x),
    _F.broadcast.default: lambda x, *_: torch.empty_like(x),
    _F.all_gather_into_tensor.default: lambda x, n, *_: x.new_empty((x.shape[0] * n, *x.shape[1:])),
    _F.reduce_scatter_tensor.default: lambda x, op, n, *_: x.new_empty((x.shape[0] // n, *x.shape[1:])),
}


def _fake_mode(placeholders: list[fx.Node]) -> Any:
    for node in placeholders:
        mode = getattr(node.meta.get("val"), "fake_mode", None)
        if mode is not None:
            return mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _with_new_outputs(signature: ExportGraphSignature, graph: fx.Graph) -> ExportGraphSignature:
    """The signature with output names following the output node (gathers may have replaced them)."""
    outputs = list(graph.output_node().args[0])
    specs: list[OutputSpec] = []
    for spec, node in zip(signature.output_specs, outputs):
        if isinstance(spec.arg, TensorArgument) and isinstance(node, fx.Node) and node.name != spec.arg.name:
            spec = OutputSpec(kind=spec.kind, arg=TensorArgument(name=node.name), target=spec.target)
        specs.append(spec)
    return ExportGraphSignature(input_specs=list(signature.input_specs), output_specs=specs)

