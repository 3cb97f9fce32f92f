"""Split policies: split_into_equal_size balances parameter counts, split_by_cost balances compute
(estimated, or given as a mapping or a function), and both reject what they cannot do."""
from __future__ import annotations

import pytest
import torch

import pp
from models import (BATCH, D, BigEmbeddingLM, MLPStack, UnevenStack, build, check_equivalent, example,
                    tokens)
from pp.stage.policies import balanced_starts, node_flops

UNIT = D * D + D  # parameters of one Linear(D, D)


def _param_counts(pipe: pp.Pipe) -> list[int]:
    return [sum(p.numel() for p in pipe.get_stage_module(s).parameters()) for s in range(pipe.num_stages)]


def _stage_flops(pipe: pp.Pipe) -> list[float]:
    return [sum(node_flops(n) for n in pipe.get_stage_module(s).graph.nodes) for s in range(pipe.num_stages)]


def _layers(pipe: pp.Pipe, s: int) -> list[str]:
    names = {n.rsplit(".", 1)[0] for n, _ in pipe.get_stage_module(s).named_parameters()}
    return sorted({n.split(".")[0] if not n.startswith("blocks.") else ".".join(n.split(".")[:2]) for n in names})


def test_split_into_equal_size_balances_parameter_counts():
    x = example(BATCH, D)
    pipe = check_equivalent(build(UnevenStack), (x,), split_policy=pp.split_into_equal_size(2))
    assert _param_counts(pipe) == [4 * UNIT, 4 * UNIT]
    pipe = check_equivalent(build(UnevenStack), (x,), split_policy=pp.split_into_equal_size(3))
    assert _param_counts(pipe) == [4 * UNIT, 2 * UNIT, 2 * UNIT]
    pipe = check_equivalent(build(MLPStack), (x,), split_policy=pp.split_into_equal_size(4))
    counts = _param_counts(pipe)
    assert len(counts) == 4 and len(set(counts)) == 1


def test_balanced_starts_minimises_the_largest_stage_then_evens_the_rest():
    assert balanced_starts([4, 1, 1, 1, 1], 2) == [0, 1]
    assert balanced_starts([4, 1, 1, 1, 1], 3) == [0, 1, 3]  # not [4], [1], [1, 1, 1]
    assert balanced_starts([1, 1, 1, 1, 1, 1], 3) == [0, 2, 4]
    assert balanced_starts([1, 9, 1, 1, 1, 1, 1, 1], 3) == [0, 1, 2]  # 9 alone is the bottleneck
    assert balanced_starts([9, 1, 1, 1, 1, 1, 1], 3) == [0, 1, 4]
    assert balanced_starts([5.0], 1) == [0]


def test_split_by_cost_balances_compute_where_equal_size_isolates_a_huge_embedding():
    idx = tokens(vocab=1024)
    model = build(BigEmbeddingLM)
    by_size = pp.pipeline(model, (idx,), split_policy=pp.split_into_equal_size(4))
    by_cost = check_equivalent(model, (idx,), split_policy=pp.split_by_cost(4))
    # By parameter count the embedding (a third of all parameters) fills a stage alone...
    assert _layers(by_size, 0) == ["tok"]
    # ... though it does almost no work; by cost it shares a stage with blocks.
    assert "tok" in _layers(by_cost, 0) and "blocks.0" in _layers(by_cost, 0)
    assert _layers(by_cost, 3) == ["head"]
    size_flops, cost_flops = _stage_flops(by_size), _stage_flops(by_cost)
    assert sum(size_flops) == pytest.approx(sum(cost_flops))
    assert max(cost_flops) < 0.8 * max(size_flops)


def test_split_by_cost_takes_costs_as_a_mapping_by_layer_name():
    costs = {"layers.0": 3.0, "layers.1": 1.0, "layers.2": 1.0, "layers.3": 1.0}
    pipe = check_equivalent(build(MLPStack), (example(BATCH, D),), split_policy=pp.split_by_cost(2, costs))
    assert [_layers_of_stack(pipe, s) for s in range(2)] == [["0"], ["1", "2", "3"]]


def test_split_by_cost_takes_costs_as_a_function_of_the_segment():
    seen = []

    def cost(segment: pp.Segment) -> float:
        seen.append((segment.name, segment.num_params, len(segment.nodes) > 0, segment.flops > 0))
        return 3.0 if segment.name == "layers.3" else 1.0

    pipe = check_equivalent(build(MLPStack), (example(BATCH, D),), split_policy=pp.split_by_cost(2, cost))
    assert [_layers_of_stack(pipe, s) for s in range(2)] == [["0", "1", "2"], ["3"]]
    mlp_params = 2 * (D * 2 * D) + 2 * D + D
    assert seen == [(f"layers.{i}", mlp_params, True, True) for i in range(4)]


def _layers_of_stack(pipe: pp.Pipe, s: int) -> list[str]:
    return sorted({n.split(".")[1] for n, _ in pipe.get_stage_module(s).named_parameters()})


def test_split_by_cost_with_an_unknown_layer_name_is_a_clear_error():
    costs = {"layers.0": 1.0, "layers.1": 1.0, "layers.2": 1.0, "layers.3": 1.0, "layers.9": 5.0}
    with pytest.raises(ValueError, match=r"'layers\.9', which the model does not have.*'layers\.0'"):
        pp.pipeline(build(MLPStack), (example(BATCH, D),), split_policy=pp.split_by_cost(2, costs))


def test_split_by_cost_with_a_layer_missing_from_costs_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no cost for 'layers\.2', 'layers\.3'"):
        pp.pipeline(build(MLPStack), (example(BATCH, D),),
                    split_policy=pp.split_by_cost(2, {"layers.0": 1.0, "layers.1": 1.0}))


def test_split_by_cost_rejects_negative_costs_and_costs_of_the_wrong_type():
    with pytest.raises(ValueError, match=r"'layers\.0' is -1\.0.*>= 0"):
        pp.pipeline(build(MLPStack), (example(BATCH, D),), split_policy=pp.split_by_cost(2, lambda s: -1.0))
    with pytest.raises(ValueError, match=r"costs is a list"):
        pp.split_by_cost(2, [1.0, 2.0])


def test_node_flops_counts_matmuls_exactly():
    pipe = pp.pipeline(build(MLPStack, n=1), (example(BATCH, D),))
    linears = [n for n in pipe.get_stage_module(0).graph.nodes if "linear" in str(n.target)]
    assert [node_flops(n) for n in linears] == [2.0 * BATCH * D * 2 * D, 2.0 * BATCH * 2 * D * D]
    assert torch.is_tensor(linears[0].meta["val"])
