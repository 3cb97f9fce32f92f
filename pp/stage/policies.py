"""Automatic split policies: cut a traced model into stages balanced by parameter count or by cost.

A policy sees the model as a list of `Segment`s (the layers of its largest repeated container, plus what
comes before and after them) and returns the indices of the segments that start a new stage. The cost
estimate comes from the traced graph's shapes, so every rank computes the same split without talking.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.fx as fx

# One element of elementwise work counted as this many FLOPs: such ops are memory-bound, and on
# current accelerators a byte moved costs on the order of a hundred FLOPs.
ELEMENTWISE_FLOPS = 64.0


@dataclass
class Segment:
    """A run of graph nodes that a cut may not divide, e.g. one transformer block."""

    name: str
    nodes: list[fx.Node] = field(default_factory=list)
    num_params: int = 0
    flops: float = 0.0


SplitPolicy = Callable[[Sequence[Segment]], list[int]]


def _numel(val) -> int:
    """Elements of a traced value at the example's sizes (symbolic sizes count at their traced value)."""
    if not isinstance(val, torch.Tensor):
        return 0
    n = 1
    for d in val.shape:
        n *= _size(d)
    return n


def _size(d) -> int:
    """One traced size as an int: a symbolic size (a batch or sequence dimension) at the example's value."""
    if isinstance(d, torch.SymInt):
        hint = d.node.hint
        return int(hint) if hint is not None else 1
    return int(d)


def node_flops(node: fx.Node) -> float:
    """Estimated forward FLOPs of one ATen node from its traced shapes (matmul-like ops exactly)."""
    if node.op != "call_function":
        return 0.0
    out = node.meta.get("val")
    name = getattr(node.target, "__name__", str(node.target))
    args = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
    out_numel = _numel(out) if isinstance(out, torch.Tensor) else sum(
        _numel(v) for v in (out if isinstance(out, (tuple, list)) else ()))
    if name.startswith(("linear", "mm", "bmm", "matmul", "addmm", "baddbmm")):
        x = args[1] if name.startswith(("addmm", "baddbmm")) else args[0]
        k = _size(x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() else 1
        return 2.0 * out_numel * k
    if "scaled_dot_product" in name and isinstance(args[0], torch.Tensor):
        q, k = args[0], args[1]
        return 4.0 * _numel(q) * _size(k.shape[-2])
    if name.startswith("convolution") and isinstance(args[1], torch.Tensor):
        w = args[1]
        return 2.0 * out_numel * _numel(w[0])
    if name.startswith(("view", "reshape", "_unsafe_view", "transpose", "permute", "t.", "expand",
                        "unsqueeze", "squeeze", "getitem", "slice", "select", "detach", "alias")):
        return 0.0
    return ELEMENTWISE_FLOPS * out_numel


def balanced_starts(costs: Sequence[float], n: int) -> list[int]:
    """Start indices of n contiguous groups: the largest group cost as small as possible (exact DP),
    and among the splits that reach it the most even one (least sum of squared group costs), so that
    one unavoidable bottleneck, e.g. an LM head, does not leave the other stages lopsided."""
    m = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")

    def best_split(score, limit: float) -> tuple[list[list[float]], list[list[int]]]:
        # best[k][i]: least score splitting the first i segments into k groups of cost <= limit
        best = [[inf] * (m + 1) for _ in range(n + 1)]
        cut = [[0] * (m + 1) for _ in range(n + 1)]
        best[0][0] = 0.0
        for k in range(1, n + 1):
            for i in range(k, m + 1):
                for j in range(k - 1, i):
                    group = prefix[i] - prefix[j]
                    if group > limit:
                        continue
                    cand = score(best[k - 1][j], group)
                    if cand < best[k][i]:
                        best[k][i], cut[k][i] = cand, j
        return best, cut

    best, _ = best_split(max, inf)
    _, cut = best_split(lambda acc, group: acc + group * group, best[n][m])
    starts, i = [], m
    for k in range(n, 0, -1):
        i = cut[k][i]
        starts.append(i)
    return sorted(starts)


def _check_num_stages(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of stages must be a positive integer, got {n!r}")


def _check_count(n: int, segments: Sequence[Segment]) -> None:
    if n > len(segments):
        names = ", ".join(s.name for s in segments)
        raise ValueError(
            f"cannot cut the model into {n} stages: it has only {len(segments)} layers that a cut may "
            f"separate ({names}); use fewer stages or place cuts with pipe_split()"
        )


def split_into_equal_size(num_stages: int) -> SplitPolicy:
    """Policy: `num_stages` stages with parameter counts as equal as the layer boundaries allow."""
    _check_num_stages(num_stages)

    def policy(segments: Sequence[Segment]) -> list[int]:
        _check_count(num_stages, segments)
        # A segment without parameters still costs something, so that stages are never empty.
        return balanced_starts([max(s.num_params, 1) for s in segments], num_stages)

    policy.num_stages = num_stages  # type: ignore[attr-defined]
    return policy


def split_by_cost(
    num_stages: int,
    costs: Mapping[str, float] | Callable[[Segment], float] | None = None,
) -> SplitPolicy:
    """Policy: `num_stages` stages balanced by compute cost rather than parameter count.

    By default the cost of a segment is its estimated FLOPs from the traced shapes (matmuls, attention,
    convolutions exactly; elementwise ops by size), so an embedding (many parameters, little work) or
    a large LM head (few layers, much work) lands where it balances the time per stage. `costs` may
    give measured numbers instead: a mapping from segment name to cost, or a function of the Segment.
    Segment names are the layers' qualified names (`"blocks.0"`, ...) plus `"<before>"` and `"<after>"`
    for what runs before the first and after the last layer.
    """
    _check_num_stages(num_stages)
    if costs is not None and not callable(costs) and not isinstance(costs, Mapping):
        raise ValueError(f"split_by_cost: costs is a {type(costs).__name__}; expected a mapping from layer "
                         f"name to cost, a function of the Segment, or None for the estimate")

    def policy(segments: Sequence[Segment]) -> list[int]:
        _check_count(num_stages, segments)
        if costs is None:
            vals = [s.flops for s in segments]
        elif callable(costs):
            vals = [float(costs(s)) for s in segments]
        else:
            names = [s.name for s in segments]
            unknown = [k for k in costs if k not in names]
            missing = [k for k in names if k not in costs]
            if unknown or missing:
                problem = (f"names {', '.join(map(repr, unknown))}, which the model does not have" if unknown
                           else f"gives no cost for {', '.join(map(repr, missing))}")
                raise ValueError(f"split_by_cost: costs {problem}; expected one cost for each layer: "
                                 f"{', '.join(map(repr, names))}")
            vals = [float(costs[k]) for k in names]
        bad = [(s.name, v) for s, v in zip(segments, vals) if not v >= 0 or v == float("inf")]
        if bad:
            raise ValueError(f"split_by_cost: cost of layer {bad[0][0]!r} is {bad[0][1]!r}; expected a "
                             f"finite number >= 0")
        return balanced_starts([max(v, 1e-9) for v in vals], num_stages)

    policy.num_stages = num_stages  # type: ignore[attr-defined]
    return policy
