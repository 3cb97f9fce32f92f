"""ZBVHalf and ZBVMin (Qi et al., "Pipeline Parallelism with Controllable Memory"): live activations per
rank against 1F1B's, simulated bubble, validity for small microbatch counts, and equality with the
unsplit model on 2 gloo ranks."""
from __future__ import annotations

import pytest

import pp
from pp.schedules.actions import Kind
from pp.schedules.classes import schedule_class
from pp.schedules.controllable import zbv_half_cap, zbv_min_cap
from pp.schedules.lower import strip_comm
from pp.schedules.registry import build_lists
from pp.schedules.simulate import bubble_fraction, simulate
from pp.testing import run_ranks

from runtime_models import run_schedule_against_reference


def peak_count(name: str, p: int, m: int) -> int:
    """Most activations (F done, W not yet; B not yet without the split) any rank holds at once."""
    _, lists = build_lists(name, p, m)
    top = 0
    for acts in strip_comm(lists).values():
        live = 0
        for a in acts:
            live += (a.kind == Kind.F) - (a.kind in (Kind.W, Kind.B))
            top = max(top, live)
    return top


def peak_memory(name: str, p: int, m: int) -> float:
    """Largest live activation on any rank, in units of a whole model's activation for one microbatch:
    a microbatch's activation on a stage lives from its F until its W (until its B without the split);
    a 1F1B stage holds 1/p of the layers, a V stage 1/(2p)."""
    return peak_count(name, p, m) / (p if name in ("1F1B", "GPipe") else 2 * p)


def bubble(name: str, p: int, m: int) -> float:
    placement, lists = build_lists(name, p, m)  # unit costs: F = I = W = 1, B = 2
    return bubble_fraction(simulate(lists, placement))


def test_memory_and_bubble_against_1f1b_at_four_ranks_sixteen_microbatches():
    """p=4, m=16, unit costs. Measured: 1F1B peak 1.00 (rank 0 holds 4 of 4 stages' worth), bubble 0.158;
    ZBVZeroBubble 1.00, 0.030; ZBVHalf 0.50 (4 V-stage activations of 8), bubble 0.103 (0.65 of 1F1B's;
    the paper: 1/2); ZBVMin 0.50 (4 of 8), bubble 0.238 (1.5 of 1F1B's; the paper: 2/3).

    The memory bounds are the caps: ZBVHalf p+1 V-stage activations, ZBVMin ceil(2p/3)+1, i.e. 5/8 and
    4/8 at p=4: 1/2 and 1/3 of 1F1B's 8, rounded up to whole activations, plus one slot a rank keeps free
    for its second stage so the V cannot block itself. The paper's own V-Min needs (p+4)//3 = 2 of 1F1B's 4
    microbatch activations at p=4, i.e. also 0.5; 1/3 is reached only for larger p (test below)."""
    ref = peak_memory("1F1B", 4, 16)
    assert ref == pytest.approx(1.0)
    half, low = peak_memory("ZBVHalf", 4, 16), peak_memory("ZBVMin", 4, 16)
    assert half <= zbv_half_cap(4) / 8 and half <= 0.5 + 1e-9, half
    assert low <= zbv_min_cap(4) / 8 == 0.5, low
    assert peak_memory("ZBVZeroBubble", 4, 16) == pytest.approx(1.0)
    b1 = bubble("1F1B", 4, 16)
    assert b1 == pytest.approx(3 / 19)
    assert bubble("ZBVHalf", 4, 16) < 0.7 * b1
    # ZBVMin's greedy order is slower than 1F1B here (measured 0.238): a regression guard, not the paper's 2/3.
    assert bubble("ZBVMin", 4, 16) < 1.6 * b1


def test_memory_falls_towards_half_and_a_third_with_more_ranks():
    """p=8, m=32. Measured: ZBVHalf 0.50 of 1F1B's peak (bubble 0.60 of 1F1B's), ZBVMin 0.375 (6 of 16
    V-stage activations; bubble 1.28 of 1F1B's)."""
    assert peak_memory("1F1B", 8, 32) == pytest.approx(1.0)
    assert peak_memory("ZBVHalf", 8, 32) <= 0.5 + 1e-9
    assert peak_memory("ZBVMin", 8, 32) <= 0.375 + 1e-9
    assert bubble("ZBVHalf", 8, 32) < 0.7 * bubble("1F1B", 8, 32)


@pytest.mark.parametrize("name", ["ZBVHalf", "ZBVMin"])
def test_every_size_is_valid_and_keeps_the_cap(name):
    cap = zbv_half_cap if name == "ZBVHalf" else zbv_min_cap
    for p in (2, 3, 5, 6):
        for m in (1, 2, p - 1, p + 1, 3 * p):
            got = peak_count(name, p, m)  # build_lists validates: no deadlock, every action once
            assert got <= cap(p), (p, m, got)


def test_names_classes_and_refusals():
    assert pp.ScheduleZBVHalf is schedule_class("zbvhalf") and pp.ScheduleZBVMin is schedule_class("ZBVMin")
    from pp.schedules.registry import get_spec
    with pytest.raises(ValueError, match="ZBVMin runs exactly 2 stage"):
        get_spec("ZBVMin").n_stages(4, 3)
    with pytest.raises(ValueError, match="ZBVHalf needs n_microbatches to be an integer >= 1, got 0"):
        get_spec("ZBVHalf").generate(8, 4, 0)


def _few_and_many(rank, world):
    return [run_schedule_against_reference(rank, world, name, n_mb, traced, steps=1)
            for name in ("ZBVHalf", "ZBVMin") for n_mb, traced in ((1, True), (3, False), (8, True))]


def test_losses_and_grads_equal_the_unsplit_model_on_two_ranks():
    assert len(run_ranks(_few_and_many, 2, timeout_s=240)[0]) == 6
