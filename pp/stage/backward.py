"""Backward split in two halves for zero-bubble schedules: input grads now (I), weight grads later (W).

I runs autograd only towards the stage inputs. On the way it records the gradient arriving at each
backward node where the path to the inputs and a path to some weights part ("split nodes"). W then
starts at those nodes with the recorded gradients and computes what each sends along its weight-side
edges, and only that, so no work of I is done twice and no weight is counted twice, however many paths
reach it (a Linear or a LayerNorm applied twice, `x @ w @ w`, a cast shared by several uses). Weights
that only outputs independent of the inputs reach (e.g. on the first stage) get a plain backward from
those outputs in W.

Hooks are honoured on the direct path; no parameter falls back to autograd because it carries hooks.
W computes weight gradients by hand but hands them to autograd at each parameter's AccumulateGrad node,
all of a microbatch's share in one engine call (a few for stages whose gradients exceed `FLUSH_BYTES`,
each parameter wholly in one). So hooks on that node (how DDP's reducer attaches), `Tensor.register_hook`
and `register_post_accumulate_grad_hook` run once per microbatch with the microbatch's whole gradient,
as under plain autograd. Python cannot tell whether a node carries hooks while a graph holds it, so this
is the default for every parameter; `NODE_HOOKS = False` lets W add the gradients of parameters without
tensor or post-accumulate hooks into `.grad` itself, linear weights inside the product (`addmm_`, one
kernel less per parameter and microbatch on a GPU), and hooks on their AccumulateGrad nodes then do not
run. (CUDA-graph replay, `pp/stage/graphs.py`, sums weight gradients inside its graphs and adds them to
`.grad` once per step, without hooks.)

Both halves sit on the hot path of zero-bubble schedules, and on a GPU their Python must stay below
the kernels they launch (bench/results/PERFORMANCE.md): I walks the graph once and lets the engine capture the
split nodes' gradients; W computes the weight-side gradients of linear layers (`mm`, `addmm`), layer
norms, and elementwise `mul`/`add` by hand from their saved tensors (read during I), so that, when every
split node is such a node, I frees the rest of the graph at once and W makes no engine call but the
accumulating one. Other split nodes go through the engine in W: one call that runs only that node where
its weight-side children hear from nothing else, otherwise a direct call of the node (its input-side
gradient is computed again and dropped). A node given tensor hooks in the stage's forward
(`h.register_hook`, `pp.stage.tensor_hooks`) is always run by the engine in W, which runs its hooks on
the gradient I captured before them. A graph holding a `torch.utils.checkpoint(use_reentrant=True)`
region makes that microbatch's I run the whole backward (torch runs that region's backward only under a
plain `backward()`), and its W does nothing.

A Python-defined autograd Function, a region compiled by `torch.compile` (`pp.stage.compiled`) among
them, is one backward node whose code computes input and weight gradients together: I runs it once,
takes its weight-side gradients at its edges in the same engine call and accumulates them at once, so
its weights are neither computed twice nor deferred, and a side effect of its backward (Megatron's
`main_grad` accumulation) happens once (W keeps only the eager split nodes around it).
"""
from __future__ import annotations

from collections import Counter
from itertools import chain
from typing import Any, Sequence

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .direct_grads import by_hand, direct_plan

# The engine entry torch.autograd.grad/backward end in; calling it directly skips their per-call
# argument checks (about two thirds of a small call's CPU time). The public API is the fallback.
_ENGINE = getattr(torch.autograd.graph, "_engine_run_backward", None)

DIRECT = True          # False: no split node is done by hand (tests use it to check the engine path)
CAPTURE_EDGES = True   # False: always the pre-hooks in I (tests use it to check that path)
FLUSH_BYTES = 64 << 20  # W hands weight gradients to autograd whenever this much is complete
NODE_HOOKS = True      # False: W writes `.grad` itself where no tensor hook asks otherwise (see above)


def run_backward(roots: Sequence, seeds: Sequence[torch.Tensor], inputs: Sequence = (), *,
                 accumulate: bool, keep_graph: bool) -> tuple:
    """One autograd engine call from `roots` (tensors or GradientEdges) seeded with `seeds` (no None).

    accumulate=True adds into `.grad` of `inputs` (of every leaf when empty) and returns (); otherwise
    returns the gradients of `inputs` (None where unreachable).
    """
    if _ENGINE is not None and all(type(s) is torch.Tensor for s in seeds):
        return _ENGINE(tuple(roots), tuple(seeds), keep_graph, False, tuple(inputs),
                       allow_unreachable=True, accumulate_grad=accumulate)
    if accumulate:
        torch.autograd.backward(list(roots), list(seeds), retain_graph=keep_graph, inputs=list(inputs) or None)
        return ()
    return torch.autograd.grad(list(roots), list(inputs), list(seeds), retain_graph=keep_graph,
                               allow_unused=True)


_ACCUMULATE = torch._C._functions.AccumulateGrad
# Backward nodes of Python autograd Functions, torch.compile'd regions (AOTAutograd's) among them: one
# backward for input and weight gradients, which W cannot run for the weights alone without running all
# of it again (twice the work, and twice any side effect: Megatron-style Functions add into
# `param.main_grad` themselves).
_PY_FUNCTION = torch.autograd.function.BackwardCFunction
# torch.utils.checkpoint's use_reentrant=True region: its backward runs the recomputed forward's own
# backward and refuses to run under torch.autograd.grad or backward(inputs=...), so I runs all of it.
_REENTRANT = "CheckpointFunctionBackward"


def _walk(root_nodes: list, input_nodes: set) -> tuple[dict, dict, Counter]:
    """One iterative DFS (deep stages overflow recursion): each node's children, whether it reaches a
    stage input, and how many edges of the graph lead into it."""
    kids: dict[Any, list] = {}
    on_path: dict[Any, bool] = {}
    stack = list(root_nodes)
    while stack:
        n = stack[-1]
        ks = kids.get(n)
        if ks is None:
            ks = kids[n] = [c for c, _ in n.next_functions if c is not None]
            stack.extend(c for c in ks if c not in kids)
            continue
        stack.pop()
        if n not in on_path:
            on_path[n] = n in input_nodes or any(on_path[c] for c in ks)
    return kids, on_path, Counter(chain.from_iterable(kids.values()))


def _reaches_weights(nodes: list, kids: dict) -> bool:
    """Whether any of `nodes` (off the input path) leads to a leaf that accumulates a gradient: the
    stage's parameters, and any other leaf the graph holds (a `loss_fn` module's own parameters, a
    tensor a closure uses), whose gradient would otherwise be dropped."""
    stack, seen = list(nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if type(n) is _ACCUMULATE:
            return True
        stack.extend(kids[n])
    return False


class Pending:
    """What I leaves for W: the split nodes (kind, node or None, captured gradients, plan, early
    targets), the seeds of roots that reach no input, the nodes W may hand over early (`_early_targets`,
    with how many of their edges are still to come), and whether I kept the graph."""

    __slots__ = ("groups", "off_roots", "early", "keeps_graph")

    def __init__(self, groups: list, off_roots: list, early: dict, keeps_graph: bool):
        self.groups, self.off_roots, self.early, self.keeps_graph = groups, off_roots, early, keeps_graph


def input_grads(roots: list[torch.Tensor], grads: list, inputs: list[torch.Tensor], *,
                node_hooks: bool | None = None, hooked: set | None = None) -> tuple[list, Pending | None]:
    """Gradients of `roots` (seeded with `grads`, no None) for `inputs`; returns them and W's state.
    W accumulates the gradient of every other leaf the graph reaches: the stage's parameters and any
    other (a `loss_fn` module's own parameters, a tensor a closure uses).

    `node_hooks` (default: the module's `NODE_HOOKS`) False lets W write `.grad` itself where no tensor
    or post-accumulate hook asks otherwise (see the module docstring): for a caller that knows nothing
    hooks the parameters' AccumulateGrad nodes. `hooked`: the nodes the forward gave tensor hooks
    (`pp.stage.tensor_hooks`); W lets the engine run those (which runs their hooks), never by hand.

    W's state keeps only split nodes with their captured gradients, and the roots that do not reach any
    input (with their seeds): the roots themselves and the other seeds are let go here. Where W can do
    every split node by hand (`direct_plan`), it keeps only the tensors those need, and I frees the rest
    of the graph as it goes (activations only the input side needed: attention, activation functions).
    Where W cannot split the backward exactly (see the module docstring), I runs all of it, weight
    gradients included, and returns None as W's state.
    """
    if not roots:
        return [None] * len(inputs), None
    if not inputs:  # nothing to hand back (first stage): W is the whole backward
        return [], Pending([], [(get_gradient_edge(r), g) for r, g in zip(roots, grads)], {}, True)
    root_nodes = [r.grad_fn for r in roots]
    input_nodes = {get_gradient_edge(x).node for x in inputs}
    kids, on_path, indeg = _walk([n for n in root_nodes if n is not None], input_nodes)
    if any(type(n).__name__ == _REENTRANT for n in kids):   # torch refuses it under an engine call for inputs
        return _whole_backward(roots, grads, inputs), None
    plain = _never if (NODE_HOOKS if node_hooks is None else node_hooks) else _plain
    input_ids = {id(x) for x in inputs}

    # Split nodes: on the input path, with a child off it that leads to weights.
    groups: list[list] = []
    compiled_edges: list = []
    stack = [n for n in root_nodes if n is not None and on_path[n]]
    seen = set(stack)
    while stack:
        n = stack.pop()
        off = []
        for c in kids[n]:
            if on_path[c]:
                if c not in seen:
                    seen.add(c)
                    stack.append(c)
            else:
                off.append(c)
        if off and _reaches_weights(off, kids):
            slots = tuple(i for i, (c, _) in enumerate(n.next_functions) if c is not None and not on_path[c])
            if isinstance(n, _PY_FUNCTION):   # one backward: it runs once, in I, its weight side too
                if any(_tensor_hooked_leaf(n.next_functions[s][0]) for s in slots):
                    return _whole_backward(roots, grads, inputs), None   # a capture there runs its hooks
                compiled_edges.extend(n.next_functions[s] for s in slots)
                continue
            group = _classify(n, slots, indeg, plain, bool(hooked) and n in hooked)
            if group is None:
                return _whole_backward(roots, grads, inputs), None
            groups.append(group)

    # Roots off the input path keep their seeds for W.
    off_roots = [(get_gradient_edge(r), g) for r, n, g in zip(roots, root_nodes, grads)
                 if n is not None and not on_path[n]]
    if off_roots and not _reaches_weights([e.node for e, _ in off_roots], kids):
        off_roots = []
    off_roots += [(get_gradient_edge(r), g) for r, n, g in zip(roots, root_nodes, grads)
                  if n is None and r.requires_grad and id(r) not in input_ids]   # a parameter returned as it is
    del kids, on_path, seen

    # A compiled region's weight-side gradients are captured at its edges and accumulated now; only
    # where nothing else feeds those edges' nodes (else another split node's W would add to them too).
    if any(indeg[c] != k for c, k in Counter(c for c, _ in compiled_edges).items()):
        return _whole_backward(roots, grads, inputs), None
    compiled_edges = list(dict.fromkeys(compiled_edges))

    # Plans read their saved tensors now: with every split node done by hand, I need not keep the graph.
    by_hand = all(kind == "plan" for kind, *_ in groups)
    edges = [GradientEdge(c, k) for c, k in compiled_edges]
    got, captured = _run_capturing(roots, grads, list(inputs) + edges, [g[1] for g in groups],
                                   keep_graph=not by_hand)
    if edges:
        _accumulate([(e, g) for e, g in zip(edges, got[len(inputs):]) if g is not None])
        got = got[:len(inputs)]
    kept = []
    for (kind, n, plan, targets), g in zip(groups, captured):
        if g is not None:
            kept.append([kind, None if kind == "plan" else n, g, plan, targets])
    return got, Pending(kept, off_roots, _early_targets(kept, indeg), not by_hand)


def _early_targets(groups: list, indeg: Counter) -> dict:
    """Nodes that settle (`_settles`) and whose every incoming edge is one of W's seeds, with their edge
    counts; each group's targets are cut down to these (W hands them to autograd once complete)."""
    edges: Counter = Counter()
    for group in groups:
        for node, count in group[4]:
            edges[node] += count
    early = {node: count for node, count in edges.items() if indeg[node] == count}
    for group in groups:
        group[4] = [(node, count) for node, count in group[4] if node in early]
    return early


def _classify(n, slots: tuple, indeg: Counter, plain, tensor_hooked: bool = False) -> list | None:
    """[kind, node, plan, targets] for split node n whose children at `slots` lie off the input path:
    "plan" (by hand), "capture" (an engine call that runs only n), "call" (n called directly); None
    where W cannot split n (a Python autograd Function whose weight side others reach too).
    `tensor_hooked`: n carries tensor hooks, which run on the gradient arriving at n only where the
    engine runs n: I captured that gradient before them (the engine's edge capture), so W needs the
    engine ("capture"); None where it cannot have it, or where I captures after them (pre-hooks)."""
    nf = n.next_functions
    if tensor_hooked and not (CAPTURE_EDGES and hasattr(n, "_input_metadata")):
        return None
    plan = direct_plan(n, slots, indeg, plain) if DIRECT and not tensor_hooked else None
    if plan is not None:
        return ["plan", n, plan, [(e.node, 1) for _, e, _, p in plan[-1] if p is None and _settles(e.node, indeg)]]
    mine = Counter(nf[s][0] for s in slots)
    exclusive = all(indeg[c] == k for c, k in mine.items())
    hooked = any(_tensor_hooked_leaf(c) for c in mine)
    targets = [(c, k) for c, k in mine.items() if _settles(c, indeg)]
    if exclusive and not hooked:
        return ["capture", n, tuple(dict.fromkeys(nf[s] for s in slots)), targets]
    if callable(n) and not tensor_hooked:
        return ["call", n, slots, targets]
    return None


def _tensor_hooked_leaf(node) -> bool:
    """Whether `node` accumulates into a leaf with tensor hooks (`p.register_hook`): capturing a gradient
    there would run them, and accumulating it would run them again."""
    return type(node) is _ACCUMULATE and bool(node.variable._backward_hooks)


def _settles(node, indeg: Counter) -> bool:
    """Whether gradients handed to `node` reach a `.grad` through nodes that nothing else feeds (none, or
    a cast or view of one parameter): W may then hand them over as soon as all of `node`'s have come."""
    for _ in range(4):
        if type(node) is _ACCUMULATE:
            return True
        kids = [c for c, _ in node.next_functions if c is not None]
        if len(kids) != 1 or indeg[kids[0]] != 1:
            return False
        node = kids[0]
    return False


def _whole_backward(roots: list, grads: list, inputs: list) -> list:
    """I as one plain backward (weight gradients accumulated now); the inputs' gradients returned."""
    old = [x.grad for x in inputs]
    for x in inputs:
        x.grad = None
    try:
        run_backward(roots, grads, accumulate=True, keep_graph=False)
        return [x.grad for x in inputs]
    finally:
        for x, g in zip(inputs, old):
            x.grad = g


def _run_capturing(roots: list, grads: list, inputs: list, nodes: list, keep_graph: bool) -> tuple[list, list]:
    """Gradients for `inputs`, and for each of `nodes` the gradients arriving at it (None if none did).

    The engine captures them itself when asked for the node's incoming edges as extra inputs; where
    this torch does not say how many edges a node has, a pre-hook per node does it."""
    if CAPTURE_EDGES and all(hasattr(n, "_input_metadata") for n in nodes):
        counts = [len(n._input_metadata) for n in nodes]
        edges = [GradientEdge(n, i) for n, k in zip(nodes, counts) for i in range(k)]
        got = run_backward(roots, grads, list(inputs) + edges, accumulate=False, keep_graph=keep_graph)
        out, at = [], len(inputs)
        for k in counts:
            g = tuple(got[at:at + k])
            out.append(g if any(x is not None for x in g) else None)
            at += k
        return list(got[:len(inputs)]), out
    captured: dict[Any, tuple] = {}
    handles = [n.register_prehook(lambda g, n=n: captured.__setitem__(n, g)) for n in nodes]
    try:
        got = run_backward(roots, grads, inputs, accumulate=False, keep_graph=keep_graph)
    finally:
        for h in handles:
            h.remove()
    return list(got), [captured.get(n) for n in nodes]


def weight_grads(pending: Pending | None) -> None:
    """Accumulate the weight gradients deferred by `input_grads` into `.grad`, top of the graph first,
    through the parameters' AccumulateGrad nodes (their hooks run once per call of this function); each
    split node is dropped once done, so a graph kept for the engine frees from the top."""
    if pending is None:
        return
    groups, early = pending.groups, pending.early
    held: dict[Any, list] = {}
    ready: list = []
    final: list = []
    size = 0
    groups.reverse()
    while groups:
        kind, node, grad_outputs, plan, targets = groups.pop()
        if kind == "plan":
            seeds = by_hand(plan, grad_outputs[0])
        elif kind == "capture":
            seeds = _captured_seeds(node, grad_outputs, plan)
        else:
            seeds = _called_seeds(node, grad_outputs, plan)
        del node, grad_outputs, plan
        for edge, g in seeds:
            if g is None:
                continue
            (held.setdefault(edge.node, []) if edge.node in early else final).append((edge, g))
        for target, count in targets:
            early[target] -= count
            if early[target] == 0:
                for seed in held.pop(target, ()):
                    ready.append(seed)
                    size += seed[1].numel() * seed[1].element_size()
        if size >= FLUSH_BYTES:
            _accumulate(ready)
            ready, size = [], 0
    _accumulate(ready + final + pending.off_roots)
    pending.off_roots = []


def _accumulate(seeds: list) -> None:
    """Hand gradients to autograd at their edges: the engine sums those meeting at a node, reduces
    broadcast shapes, and runs the rest of the way down to `.grad` (with every hook on the way)."""
    if seeds:
        run_backward([e for e, _ in seeds], [g for _, g in seeds], accumulate=True, keep_graph=False)


def _captured_seeds(node, grad_outputs: tuple, edges: tuple) -> list:
    """Split node `node`'s weight-side gradients through the engine, asked for the inputs of its
    weight-side children: only `node` runs, since nothing else leads to those children."""
    roots = [GradientEdge(node, i) for i, g in enumerate(grad_outputs) if g is not None]
    targets = [GradientEdge(c, k) for c, k in edges]
    got = run_backward(roots, [g for g in grad_outputs if g is not None], targets, accumulate=False,
                       keep_graph=False)
    return list(zip(targets, got))


def _called_seeds(node, grad_outputs: tuple, slots: tuple) -> list:
    """Split node `node` called directly: what it sends along each weight-side edge (its input-side
    gradients are computed too and dropped); the engine reduces broadcast shapes when accumulating."""
    with torch.no_grad():
        out = node(*grad_outputs)
    if isinstance(out, torch.Tensor):
        out = (out,)
    nf = node.next_functions
    return [(GradientEdge(*nf[s]), out[s]) for s in slots]


def _never(node) -> None:
    """W never writes `.grad` itself (node hooks honoured)."""
    return None


def _plain(node) -> torch.Tensor | None:
    """The parameter behind AccumulateGrad node `node` if W may write its `.grad` itself (no tensor or
    post-accumulate hook on it, a plain layout); used where node hooks need not run. For a bfloat16 weight
    copy of bf16-mixed (`pp.parallel.precision.Bf16Weights`): its float32 master, whose `.grad` W then adds
    the bfloat16 gradient into, as the copy's own hook would."""
    if type(node) is not _ACCUMULATE:
        return None
    p = node.variable
    p = getattr(p, "_pp_master", p)   # a bf16-mixed weight copy: its gradient goes to its float32 master
    if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None) or not p.is_contiguous():
        return None
    return p
