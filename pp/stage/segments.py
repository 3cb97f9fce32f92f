"""Segments of a traced model: the layers a split policy may cut between, and inserting the cuts.

A policy sees the model as a list of `Segment`s (the blocks of its repeated containers, plus what comes
before and after), each with its FLOPs and parameter count; its chosen starts become
`pipe_split` nodes in the graph.
"""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from .marker import PIPE_SPLIT_OP
from .policies import Segment, node_flops


def is_split(node: fx.Node) -> bool:
    """Whether `node` is a pipe_split marker."""
    return node.op == "call_function" and node.target is PIPE_SPLIT_OP


def model_segments(module: nn.Module, graph: fx.Graph) -> list[Segment]:
    """Split the graph into the layers a policy may cut between.

    The layers are the children of the model's block containers: every ModuleList / Sequential of
    blocks of one type that no other such container holds (a ResNet's layer1..layer4, an
    encoder-decoder's two stacks), or else its largest container. Everything before the first layer
    and after the last are two more segments; glue between layers stays with the layer before it.
    A model without containers is segmented by its top-level children.
    """
    containers = _layer_containers(module)
    params = {n: p.numel() for n, p in module.named_parameters()}
    nodes = [n for n in graph.nodes if n.op == "call_function" and not is_split(n)]
    layer = [_segment_name(_module_path(n), containers) for n in nodes]
    in_layer = [i for i, name in enumerate(layer) if name is not None]
    first, last = (in_layer[0], in_layer[-1]) if in_layer else (len(nodes), -1)
    seg_of_node: dict[fx.Node, str] = {}
    order: list[str] = []
    current = "<before>"
    for i, node in enumerate(nodes):
        if i < first:
            name = "<before>"
        elif i > last:
            name = "<after>"
        else:
            name = layer[i] or current  # glue between layers stays with the layer before it
        current = name
        if name not in order:
            order.append(name)
        seg_of_node[node] = name
    segments = {name: Segment(name) for name in order}
    for node, name in seg_of_node.items():
        segments[name].nodes.append(node)
        segments[name].flops += node_flops(node)
    counted: set[str] = set()
    for seg in segments.values():
        for node in seg.nodes:
            for arg in node.all_input_nodes:
                fqn = arg.meta.get("pp_param")
                if fqn and fqn not in counted:
                    counted.add(fqn)
                    seg.num_params += params.get(fqn, 0)
    return [segments[n] for n in order]


def _module_path(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [fqn for fqn, _ in stack.values() if fqn]


def _layer_containers(module: nn.Module) -> list[str] | None:
    """Names of the containers whose children are the layers; None: use the top-level children."""
    lists = {name: sub for name, sub in module.named_modules()
             if isinstance(sub, (nn.ModuleList, nn.Sequential)) and len(sub) > 0}
    block_types = {type(next(iter(sub))) for sub in lists.values()
                   if len(sub) > 1 and len({type(c) for c in sub}) == 1}
    blocks = [name for name, sub in lists.items() if {type(c) for c in sub} <= block_types
              and len({type(c) for c in sub}) == 1]
    outer = [n for n in blocks if not any(_inside(n, other) for other in blocks if other != n)]
    if outer:
        return outer
    best, best_n = None, 1
    for name, sub in lists.items():
        if len(sub) > best_n:
            best, best_n = name, len(sub)
    return None if best is None else [best]


def _inside(name: str, container: str) -> bool:
    return container == "" or name.startswith(container + ".")


def _segment_name(path: list[str], containers: list[str] | None) -> str | None:
    if containers is None:
        return path[0].split(".")[0] if path else None
    for p in path:
        for c in containers:
            prefix = c + "." if c else ""
            if p.startswith(prefix) and p != c:
                return prefix + p[len(prefix):].split(".")[0]
    return None


def insert_cuts(graph: fx.Graph, segments: list[Segment], starts: list[int]) -> None:
    """Put a pipe_split before the first node of each segment in `starts` (after the first)."""
    starts = sorted(set(int(s) for s in starts))
    if not starts or starts[0] != 0 or starts[-1] >= len(segments):
        raise ValueError(f"split policy returned cut positions {starts}; expected sorted segment indices "
                         f"starting with 0 and below {len(segments)}")
    for s in starts[1:]:
        first = segments[s].nodes[0]
        with graph.inserting_before(first):
            graph.call_function(PIPE_SPLIT_OP, ())
