"""The splitter: trace a model once with torch.export, cut the graph, rebuild one module per stage.

Every rank runs the same deterministic steps on the same model and gets the same stages. The graph is
functionalised first, so an in-place op on a value that crossed a cut cannot corrupt the producer's
copy, and stage modules hold the user's parameters and buffers under their original qualified names.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._pytree import tree_map

from .contract import expr_of, is_symbolic, shape_guards
from .marker import SplitPoint
from .modes import ModeTraces, graph_code
from .pipe import MODEL_INPUT, InputBinder, Pipe, PipeInfo, StageIO
from .policies import Segment, SplitPolicy
from .segments import insert_cuts as _insert_cuts
from .segments import is_split as _is_split
from .segments import model_segments
from .trace import PipelineTraceError, cuts_by_module, export_model
from .stage_params import attr_name, canonical_names, install, named_tensors, order_like, place_unused, shared_params
from .traced import cache_in_output, drop_identity_views, drop_metadata_asserts, views_as_reshapes, way_out


def _on_model_device(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example inputs on the model's device where all its weights share one (not meta): they only
    give shapes and dtypes, and a model on the CPU traced with inputs on a GPU (or the reverse) would
    fail inside torch.export on mixed devices."""
    devices = {t.device for t in (*module.parameters(), *module.buffers())}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        return args, kwargs
    device = next(iter(devices))

    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) and t.device != device and t.device.type != "meta" else t

    return tree_map(move, args), tree_map(move, kwargs)


def _dense_examples(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Example tensors in a dense layout: only shapes and dtypes are traced, and a strided view (one
    microbatch sliced out along dim 1) makes torch.export's variable-size trace fail inside torch."""
    def dense(t):
        if not isinstance(t, torch.Tensor) or t.is_contiguous() or (
                t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
            return t
        return t.contiguous()

    return tree_map(dense, args), tree_map(dense, kwargs)


def pipeline(
    module: nn.Module,
    mb_args: tuple,
    mb_kwargs: dict | None = None,
    split_spec: Mapping[str, SplitPoint] | None = None,
    split_policy: SplitPolicy | None = None,
    *,
    dynamic: bool = True,
) -> Pipe:
    """Trace `module` on one microbatch of example inputs and cut it into a `Pipe`.

    Cuts come from `pipe_split()` calls inside forward, from `split_spec` (submodule name ->
    SplitPoint.BEGINNING / END), or from `split_policy` (e.g. `split_by_cost(4)`).

    The stages are not frozen to the example's shapes: every input dimension of size >= 2 stays
    symbolic unless the model fixes it (torch.export `Dim.AUTO`), and sizes a stage reads (`x.shape`)
    are taken from its own inputs, so other batch sizes and sequence lengths give the unsplit model's
    results. Sizes of 0 or 1 in the example, sizes the model fixes, and sizes breaking a condition
    the model puts on them (e.g. an even length) make `step()` raise a ValueError naming the stage,
    the traced shape and the given one before anything is sent. A model that torch.export can only
    trace with fixed sizes is traced so, and then takes exactly the example's shapes.

    `dynamic=False` traces at the example's sizes only: the stages then take exactly its shapes (others
    are refused as above), and tracing takes about half as long (no symbolic sizes to reason about) --
    for callers that only ever run one microbatch shape, as `pp.run` does.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"pipeline() needs an nn.Module, got {type(module).__name__}")
    if isinstance(mb_args, torch.Tensor) or not isinstance(mb_args, (tuple, list)):
        mb_args = (mb_args,)
    mb_kwargs = dict(mb_kwargs or {})
    if not isinstance(dynamic, bool):
        raise TypeError(f"pipeline(dynamic=...) takes True or False, got {dynamic!r}")
    if split_spec is not None and split_policy is not None:
        raise ValueError("pass either split_spec or split_policy to pipeline(), not both")
    mb_args, mb_kwargs = _dense_examples(*_on_model_device(module, tuple(mb_args), mb_kwargs))
    cuts: list = []   # the policy's cuts (segment count, starts), kept so a retrace cuts alike
    pipe = _trace_and_cut(module, tuple(mb_args), mb_kwargs, split_spec, split_policy, dynamic, cuts)

    def retrace(model: nn.Module, training: bool) -> tuple[list, list, list]:
        on_meta = any(t.is_meta for t in model.parameters())   # a meta copy (pp.stage.modes) takes meta examples
        args, kwargs = tree_map(lambda t: t.to("meta") if on_meta and isinstance(t, torch.Tensor) else t,
                                (tuple(mb_args), mb_kwargs))
        again = _trace_and_cut(model, args, kwargs, split_spec, _same_cuts(cuts[0], training) if cuts else None,
                               dynamic, [])
        return list(again.stage_modules), again.info().stage_io, again.info().shape_guards

    norms = [n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if norms:   # the one way a microbatched step differs from the whole batch's: say so, not silently
        warnings.warn(f"{type(module).__name__} has batch norm in train mode ({', '.join(norms[:3])}"
                      f"{', ...' if len(norms) > 3 else ''}): each microbatch is normalised with its own "
                      f"statistics, so losses and gradients are the unsplit model's on microbatch-sized "
                      f"batches, not on the whole batch (as in every pipeline and gradient accumulation)",
                      stacklevel=2)
    pipe.info().mode_traces = ModeTraces(module, retrace, [graph_code(gm) for gm in pipe.stage_modules],
                                         module.training)
    for gm in pipe.stage_modules:   # the stage modules start in the model's mode, as traced
        gm.train(module.training)
    return pipe


class UnlessMarked:
    """A split policy that cuts only a model calling no pipe_split(): one that calls it is cut there
    instead (pp.parallelize's default, decided on the one trace rather than tracing twice)."""

    def __init__(self, policy: SplitPolicy):
        self.policy = policy

    def __call__(self, segments: Sequence[Segment]) -> list[int]:
        return self.policy(segments)


def _same_cuts(first: tuple[int, list], training: bool) -> SplitPolicy:
    n_segments, starts = first

    def policy(segments: list) -> list:
        if len(segments) != n_segments:
            raise ValueError(f"the model has {len(segments)} layers to cut between in "
                             f"{'train' if training else 'eval'} mode but {n_segments} in the mode it was traced "
                             f"in, so its stages cannot be cut alike in both")
        return starts
    return policy


def _trace_and_cut(module: nn.Module, mb_args: tuple, mb_kwargs: dict, split_spec, split_policy, dynamic: bool,
                   cuts: list) -> Pipe:
    """Export `module`, cut it (appending (segment count, starts) of a policy's cut to `cuts`), build the pipe."""
    with cuts_by_module(module, split_spec or {}) as calls:
        ep = export_model(module, tuple(mb_args), mb_kwargs, restart=lambda: calls.update(dict.fromkeys(calls, 0)),
                          dynamic=dynamic)
    graph = ep.graph
    cache = cache_in_output(ep.call_spec.out_spec)
    if cache is not None:
        raise PipelineTraceError(f"{type(module).__name__} returns a {cache} object. {way_out('Cache')}")
    views_as_reshapes(graph)
    drop_metadata_asserts(graph)
    drop_identity_views(graph)
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.PARAMETER:
            placeholders[spec.arg.name].meta["pp_param"] = spec.target
    if isinstance(split_policy, UnlessMarked) and any(_is_split(n) for n in graph.nodes):
        split_policy = None   # the model's own pipe_split() calls cut it
    if split_policy is not None:
        if any(_is_split(n) for n in graph.nodes):
            raise ValueError("the model already calls pipe_split(); a split_policy would add more cuts. "
                             "Remove the pipe_split() calls or drop split_policy")
        segments = model_segments(module, graph)
        starts = split_policy(segments)
        cuts.append((len(segments), list(starts)))
        _insert_cuts(graph, segments, starts)
    return _build_pipe(module, ep, tuple(mb_args), mb_kwargs)


# ------------------------------------------------------------------------------------------ partition

def _build_pipe(module: nn.Module, ep: torch.export.ExportedProgram, mb_args: tuple, mb_kwargs: dict) -> Pipe:
    graph = ep.graph
    sig = ep.graph_signature
    attr_of: dict[str, tuple[str, str]] = {}  # placeholder name -> (kind, fqn)
    user_inputs: list[fx.Node] = []
    traced_constants: dict[int, Any] = {}
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    canonical = canonical_names(module)
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            attr_of[name] = ("param", canonical.get(spec.target, spec.target))
        elif spec.kind == InputKind.BUFFER:
            attr_of[name] = ("buffer" if spec.persistent is not False else "buffer_np", spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            attr_of[name] = ("const", spec.target)
        elif spec.kind == InputKind.USER_INPUT:
            if hasattr(spec.arg, "value"):
                traced_constants[len(user_inputs)] = spec.arg.value
            user_inputs.append(placeholders[name])
        else:
            raise PipelineTraceError(f"the traced model has an input of kind {spec.kind.name} "
                                     f"({name}), which pp cannot place on a stage")
    output_node = next(n for n in graph.nodes if n.op == "output")
    flat_outputs = list(output_node.args[0])
    user_outputs: list[Any] = []
    buffer_updates: list[tuple[str, fx.Node]] = []
    for spec, value in zip(sig.output_specs, flat_outputs):
        if spec.kind == OutputKind.USER_OUTPUT:
            user_outputs.append(value)
        elif spec.kind == OutputKind.BUFFER_MUTATION:
            buffer_updates.append((spec.target, value))
        elif spec.kind == OutputKind.USER_INPUT_MUTATION:   # the graph computes on the new value already
            warnings.warn(f"the traced model modifies its input {spec.target!r} in place (an in-place op on it, "
                          f"such as nn.ReLU(inplace=True) first): the stages compute with the modified value, "
                          f"as the model does, but leave the tensor you pass unchanged", stacklevel=3)
        else:
            raise PipelineTraceError(f"the traced model mutates one of its inputs in place ({spec.kind.name}: "
                                     f"{spec.target}); return the new value instead")

    # Which stage computes each node: a running count of cut markers; getitem follows its source.
    stage_of: dict[fx.Node, int] = {n: 0 for n in user_inputs}
    cur = 0
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if _is_split(node):
            cur += 1
        elif node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0] in stage_of:
            stage_of[node] = stage_of[node.args[0]]
        else:
            stage_of[node] = cur
    num_stages = cur + 1
    for s in range(num_stages):
        if not any(st == s and n.op == "call_function" for n, st in stage_of.items()) and num_stages > 1:
            raise ValueError(f"stage {s} of {num_stages} would be empty: two cuts (pipe_split or split_spec) "
                             f"fall at the same place, or a cut falls before the first or after the last op")

    syms = {n for n in graph.nodes if n.op == "call_function" and is_symbolic(n)}
    remat = _rematerialisable(graph, attr_of, syms)
    mutated = {fqn for fqn, _ in buffer_updates}
    # A buffer update runs on the last stage that reads the buffer, so earlier readers see the old value.
    update_stage = {}
    stale_buffers: dict[str, tuple[list[int], int]] = {}
    for fqn, value in buffer_updates:
        readers = [stage_of[u] for n, (k, f) in attr_of.items() if f == fqn for u in placeholders[n].users
                   if u in stage_of]
        update_stage[fqn] = max([stage_of.get(value, 0)] + readers)
        if any(r != update_stage[fqn] for r in readers):   # fine in one process (one tensor), not pipelined
            stale_buffers[fqn] = (sorted(set(readers)), update_stage[fqn])

    # Values each stage needs from earlier stages, in order of first use; sizes (SymInts) are found
    # later, from the stage's own inputs where one of them has that size.
    needs: list[list[fx.Node]] = [[] for _ in range(num_stages)]
    sizes: list[list[fx.Node]] = [[] for _ in range(num_stages)]

    def need(stage: int, value: Any) -> None:
        for arg in _nodes_in(value):
            if arg.op == "placeholder" and arg.name in attr_of:
                continue
            if arg in syms:
                if stage_of[arg] != stage and arg not in sizes[stage]:
                    sizes[stage].append(arg)
                continue
            if arg in remat:
                need(stage, list(arg.all_input_nodes))
                continue
            if stage_of[arg] < stage and arg not in needs[stage]:
                needs[stage].append(arg)

    for node in graph.nodes:
        if node.op == "call_function" and not _is_split(node):
            need(stage_of[node], list(node.all_input_nodes))
    for fqn, value in buffer_updates:
        need(update_stage[fqn], value)
    need(num_stages - 1, user_outputs)
    size_plans = [_size_plan(sizes[s], needs[s]) for s in range(num_stages)]
    for s, plan in enumerate(size_plans):
        needs[s].extend(n for n in sizes[s] if n not in plan)  # no input has that size: sent as a value

    outputs: list[list[fx.Node]] = [[] for _ in range(num_stages)]
    for t in range(num_stages):
        for value in needs[t]:
            if value not in outputs[stage_of[value]]:
                outputs[stage_of[value]].append(value)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for outs in outputs:
        outs.sort(key=order.__getitem__)

    tensors_by_name = named_tensors(module, ep)
    stage_modules, stage_io = [], []
    consumers: list[list[list[tuple[int, int]]]] = [[[] for _ in outs] for outs in outputs]
    for s in range(num_stages):
        inputs = user_inputs if s == 0 else needs[s]
        sources = [(MODEL_INPUT, i) for i in range(len(user_inputs))] if s == 0 else [
            (stage_of[v], outputs[stage_of[v]].index(v)) for v in needs[s]]
        for slot, (src, idx) in enumerate(sources):
            if src != MODEL_INPUT:
                consumers[src][idx].append((s, slot))
        stage_outputs = user_outputs if s == num_stages - 1 else outputs[s]
        updates = [(f, v) for f, v in buffer_updates if update_stage[f] == s]
        gm = _stage_module(s, graph, stage_of, remat, attr_of, inputs, stage_outputs, updates, mutated,
                           tensors_by_name, size_plans[s])
        stage_modules.append(gm)
        stage_io.append(StageIO(input_sources=sources, output_consumers=None))  # type: ignore[arg-type]
    for s, io in enumerate(stage_io):
        io.output_consumers = consumers[s] if s < num_stages - 1 else [[] for _ in user_outputs]

    place_unused(module, stage_modules)
    for gm in stage_modules:
        order_like(module, gm)
    shared, metas = shared_params(module, stage_modules)
    binder = InputBinder(module.forward, mb_args, mb_kwargs, ep.call_spec.in_spec, traced_constants)
    info = PipeInfo(num_stages=num_stages, stage_io=stage_io, input_binder=binder,
                    out_spec=ep.call_spec.out_spec, shared_params=shared,
                    param_meta={n: metas[n] for n in shared},
                    shape_guards=shape_guards(ep, [n.meta.get("val") for n in user_inputs]),
                    stale_buffers=stale_buffers, mutated_buffers=sorted({fqn for fqn, _ in buffer_updates}))
    return Pipe(stage_modules, info)


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, lambda n: found.append(n) or n)
    return found


def _rematerialisable(graph: fx.Graph, attr_of: dict, syms: set[fx.Node]) -> set[fx.Node]:
    """Nodes computed from constants and sizes alone (arange, full, ...): each stage recomputes them
    instead of receiving them. Random ops are excluded, since a second draw would differ."""
    remat: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function" or _is_split(node) or node in syms:
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and (
                torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable):
            continue
        inputs = node.all_input_nodes
        if all(a in remat or a in syms or (a.op == "placeholder" and attr_of.get(a.name, ("",))[0] == "const")
               for a in inputs):
            remat.add(node)
    return remat


def _size_plan(wanted: list[fx.Node], inputs: list[fx.Node]) -> dict[fx.Node, tuple]:
    """How a stage computes each size it uses that an earlier stage computed: {size node: ("size",
    input node, dim)} where one of its inputs has that size in a dimension, or ("copy",) where the node
    is arithmetic on such sizes. Sizes missing from the plan are sent from the stage computing them."""
    plan: dict[fx.Node, tuple] = {}

    def local(n: fx.Node) -> bool:
        if n in plan:
            return True
        want = expr_of(n.meta["val"])
        for t in inputs:
            val = t.meta.get("val")
            if isinstance(val, torch.Tensor):
                for d, size in enumerate(val.shape):
                    if expr_of(size) == want:
                        plan[n] = ("size", t, d)
                        return True
        args = n.all_input_nodes
        if args and all(is_symbolic(a) for a in args) and all(local(a) for a in args):
            plan[n] = ("copy",)
            return True
        return False

    for n in wanted:
        local(n)
    return plan


def _stage_module(stage: int, graph: fx.Graph, stage_of, remat, attr_of, inputs, outputs, updates,
                  mutated, named_tensors, size_plan) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    used_attrs: dict[str, str] = {}  # fqn -> kind
    for node in inputs:
        env[node] = g.placeholder(node.name)
        env[node].meta = dict(node.meta)

    def value_of(n: fx.Node) -> fx.Node:
        if n in env:
            return env[n]
        if n.op == "placeholder" and n.name in attr_of:
            kind, fqn = attr_of[n.name]
            used_attrs[fqn] = kind
            env[n] = g.get_attr(attr_name(fqn, kind))
            if fqn in mutated:
                # The graph reads the value from before the update; autograd may save it for backward
                # (batch norm saves its running stats), so read a snapshot that the update cannot touch.
                env[n] = g.call_function(torch.ops.aten.clone.default, (env[n],))
            env[n].meta = dict(n.meta)
            return env[n]
        if n in remat:
            return copy(n)
        plan = size_plan.get(n)
        if plan is not None and plan[0] == "size":  # this size, read off one of the stage's own inputs
            env[n] = g.call_function(torch.ops.aten.sym_size.int, (value_of(plan[1]), plan[2]))
            env[n].meta = dict(n.meta)
            return env[n]
        if plan is not None:
            return copy(n)
        raise AssertionError(f"stage {stage} needs {n.name}, which is neither local nor an input")

    def copy(n: fx.Node) -> fx.Node:
        new = g.node_copy(n, value_of)
        env[n] = new
        return new

    for node in graph.nodes:
        if node.op == "call_function" and not _is_split(node) and stage_of.get(node) == stage and node not in env:
            copy(node)
    for fqn, value in updates:
        kind = next(k for k, f in attr_of.values() if f == fqn)  # "buffer" or "buffer_np"
        used_attrs.setdefault(fqn, kind)
        buf = g.get_attr(attr_name(fqn, kind))
        # the value written back is state for later forwards, not part of this one's graph (as eager's
        # update under no_grad): undetached, each microbatch's graph would chain to the one before
        new = fx.node.map_arg(value, value_of)
        if isinstance(new, fx.Node):
            new = g.call_function(torch.ops.aten.detach.default, (new,))
        g.call_function(torch.ops.aten.copy_.default, (buf, new))
    g.output(tuple(fx.node.map_arg(o, value_of) if isinstance(o, fx.Node) else o for o in outputs))

    root = nn.Module()
    for fqn, kind in used_attrs.items():
        install(root, attr_name(fqn, kind), named_tensors[fqn], kind)
        if kind == "param":  # register every alias of the parameter too, as the original state dict has
            target = named_tensors[fqn]
            for other, t in named_tensors.items():
                if t is target and other != fqn and isinstance(t, nn.Parameter):
                    install(root, other, t, kind)
    g.lint()
    gm = fx.GraphModule(root, g, class_name=f"PipeStage{stage}")
    for fqn, kind in used_attrs.items():
        if kind in ("buffer_np", "const"):
            owner, _, leaf = attr_name(fqn, kind).rpartition(".")
            gm.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
    for fqn, kind in used_attrs.items():  # aliases that GraphModule did not copy (not referenced by the graph)
        if kind == "param":
            target = named_tensors[fqn]
            for other, t in named_tensors.items():
                if t is target and other != fqn and isinstance(t, nn.Parameter):
                    install(gm, other, t, kind)
    return gm
