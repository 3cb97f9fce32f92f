"""CUDA-graph replay of stages: what is refused (on any machine) and, on a GPU, replayed stages against the
unsplit model for the schedules that allow it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pp.schedules.classes import _in_flight_peak
from pp.schedules.classes import schedule_class
from pp.schedules.registry import build_lists
from pp.testing import run_ranks

from runtime_models import DeepMLP, build_stages, run_schedule_against_reference

GRAPHABLE = ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS"]
SPLIT_BACKWARD = ["InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]


def test_slots_are_the_most_microbatches_in_flight_per_stage():
    _, lists = build_lists("1F1B", 4, 8)
    assert [_in_flight_peak(lists[r], r) for r in range(4)] == [4, 3, 2, 1]
    _, lists = build_lists("GPipe", 2, 6)
    assert [_in_flight_peak(lists[r], r) for r in range(2)] == [6, 6]


def _refusals(rank, world):
    out = {}
    x = torch.randn(8, 4)
    for name in ["1F1B", *SPLIT_BACKWARD]:
        torch.manual_seed(0)
        stages, _ = build_stages(DeepMLP(n_layers=8), name, world, rank, x[:2], True, "cpu")
        sched = schedule_class(name)(stages[0] if name == "1F1B" else stages, 4, loss_fn=F.mse_loss)
        try:
            sched.enable_cuda_graphs()
            out[name] = "accepted"
        except ValueError as e:
            out[name] = str(e)
    return out


def test_cpu_stages_and_split_backward_schedules_are_refused_with_the_reason():
    got = run_ranks(_refusals, 2)[0]
    assert "stage 0 is on cpu" in got["1F1B"], got["1F1B"]
    for name in SPLIT_BACKWARD:
        assert "(I/W)" in got[name] and "1F1B, Interleaved1F1B" in got[name], got[name]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize("name", GRAPHABLE)
def test_replayed_stages_match_the_unsplit_model_on_one_gpu(name, traced):
    run_ranks(run_schedule_against_reference, 1, name, 4, traced, 3, "cuda", True, backend="nccl")


def _parallelize_refusals(rank, world):
    from runtime_models import DeepMLP as Net
    import pp
    from pp.tp import ColwiseParallel

    out = []
    for kwargs in (dict(tp=2, tp_plan={"layers.0": ColwiseParallel()}), dict()):
        try:
            pp.parallelize(Net(n_layers=4), (torch.randn(2, 4),), n_microbatches=2, loss_fn=F.mse_loss,
                           cuda_graphs=True, device="cpu", **kwargs)
            out.append("accepted")
        except ValueError as e:
            out.append(str(e))
    return out


def test_parallelize_refuses_cuda_graphs_with_tp_and_on_cpu():
    with_tp, on_cpu = run_ranks(_parallelize_refusals, 2)[0]
    assert with_tp.startswith("cuda_graphs=True with tp=2"), with_tp
    assert "stage 0 is on cpu" in on_cpu, on_cpu
