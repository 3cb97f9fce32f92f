"""Schedules as data: generators, lowering, validation, simulation and CSV (no processes, no torch)."""
from __future__ import annotations

import json

import pytest

from pp.schedules.actions import Action, B, F, I, Kind
from pp.schedules.csvio import read_actions, write_actions
from pp.schedules.lower import compute_ticks, lower, strip_comm
from pp.schedules.registry import SCHEDULES, build_lists, get_spec, stage_to_rank
from pp.schedules.simulate import DEFAULT_COSTS, TimelineEvent, bubble_fraction, from_chrome_trace, simulate
from pp.schedules.validate import ScheduleError, run_strict, stage_graph, validate, validate_compute


def acts(*texts: str) -> list[Action]:
    return [Action.parse(t) for t in texts]


def plan(name: str, p: int, m: int, v: int | None = None):
    spec = get_spec(name)
    n_stages = spec.n_stages(p, v)
    placement = spec.placement(n_stages, p)
    return placement, spec.generate(n_stages, p, m)


# ------------------------------------------------------------------------------------------ registry
def test_registry_has_exactly_the_nine_schedules():
    assert list(SCHEDULES) == ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble",
                               "ZBVZeroBubble", "DualPipeV", "ZBVHalf", "ZBVMin"]
    assert [SCHEDULES[n].split_backward for n in SCHEDULES] == [False] * 4 + [True] * 5
    assert [SCHEDULES[n].stages_per_rank for n in SCHEDULES] == [1, 1, None, None, None, 2, 2, 2, 2]


def test_get_spec_is_case_insensitive_and_names_valid_ones_on_error():
    assert get_spec("zbvzerobubble").name == "ZBVZeroBubble"
    with pytest.raises(ValueError, match=r"unknown schedule 'Foo': expected one of GPipe, 1F1B, .*DualPipeV"):
        get_spec("Foo")


def test_stage_to_rank_loop_and_v():
    assert stage_to_rank("loop", 8, 4) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert stage_to_rank("v", 8, 4) == [0, 1, 2, 3, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="v placement needs n_stages = 2 \\* n_ranks = 8, got 12"):
        stage_to_rank("v", 12, 4)
    with pytest.raises(ValueError, match="unknown placement style 'zigzag'"):
        stage_to_rank("zigzag", 8, 4)


def test_generators_reject_sizes_they_cannot_run():
    with pytest.raises(ValueError, match="1F1B needs 1 stage\\(s\\) per rank, i.e. n_stages=4 for n_ranks=4, got n_stages=8"):
        get_spec("1F1B").generate(8, 4, 4)
    with pytest.raises(ValueError, match="Interleaved1F1B needs n_stages to be a multiple of n_ranks"):
        get_spec("Interleaved1F1B").generate(6, 4, 4)
    with pytest.raises(ValueError, match="DualPipeV needs n_microbatches to be an integer >= 1, got 0"):
        get_spec("DualPipeV").generate(8, 4, 0)
    with pytest.raises(ValueError, match="ZBVZeroBubble runs exactly 2 stage"):
        get_spec("ZBVZeroBubble").n_stages(4, 3)


# ------------------------------------------------------------------------------------ generators: exact
def test_1f1b_order_is_warmup_then_alternating_then_cooldown():
    _, c = plan("1F1B", 2, 3)
    assert c == {0: acts("0F0", "0F1", "0B0", "0F2", "0B1", "0B2"), 1: acts("1F0", "1B0", "1F1", "1B1", "1F2", "1B2")}


def test_gpipe_and_looped_bfs_orders():
    assert plan("GPipe", 2, 2)[1] == {0: acts("0F0", "0F1", "0B0", "0B1"), 1: acts("1F0", "1F1", "1B0", "1B1")}
    assert plan("LoopedBFS", 2, 2)[1][0] == acts("0F0", "0F1", "2F0", "2F1", "2B0", "2B1", "0B0", "0B1")


def test_interleaved_1f1b_is_megatron_order():
    _, c = plan("Interleaved1F1B", 2, 4)
    assert c[0] == acts("0F0", "0F1", "2F0", "2F1", "0F2", "2B0", "0F3", "2B1", "2F2", "0B0", "2F3", "0B1",
                        "2B2", "2B3", "0B2", "0B3")
    assert c[1][:6] == acts("1F0", "1F1", "3F0", "3B0", "3F1", "3B1")


def test_dualpipev_phases_match_deepseek_order():
    _, c = plan("DualPipeV", 4, 16)
    assert c[0][:13] == acts("0F0", "0F1", "0F2", "0F3", "0F4", "0F5", "0F6", "7F0", "7I0", "7W0", "7F1", "7I1", "7W1")
    assert c[3][:12] == acts("3F0", "4F0", "3F1", "4F1", "3F2", "4F2", "3F3", "4F3", "3F4", "4B0", "4F4", "3B0")
    kinds = {a.kind for r in c for a in c[r]}
    assert kinds == {Kind.F, Kind.B, Kind.I, Kind.W}


def _peaks(lists):
    """Per rank: (max activations held: F done, B/I not; max deferred W's: I done, W not)."""
    out = {}
    for r, rank_acts in lists.items():
        held = deferred = top_held = top_deferred = 0
        for a in rank_acts:
            held += (a.kind == Kind.F) - (a.kind in (Kind.B, Kind.I))
            deferred += (a.kind == Kind.I) - (a.kind == Kind.W)
            top_held, top_deferred = max(top_held, held), max(top_deferred, deferred)
        out[r] = (top_held, top_deferred)
    return out


@pytest.mark.parametrize("p", [2, 4, 8])
def test_zero_bubble_memory_bounds(p):
    for m in (p, 2 * p + 1, 4 * p):
        for r, (held, deferred) in _peaks(plan("ZBVZeroBubble", p, m)[1]).items():
            assert held <= 2 * p and deferred <= 2 * p, (m, r)
        for r, (held, deferred) in _peaks(plan("InterleavedZeroBubble", p, m)[1]).items():
            assert held <= 2 * p - r and deferred <= 2 * p, (m, r)


# -------------------------------------------------------------------- generate -> lower -> validate
def sizes() -> list[tuple[int, int]]:
    """(ranks, microbatches): every count p..4p up to 4 ranks, then a spread (the file must stay fast)."""
    small = [(p, m) for p in range(1, 5) for m in range(p, 4 * p + 1)]
    return small + [(p, m) for p in range(5, 9) for m in (p, p + 1, 2 * p - 1, 2 * p, 3 * p + 1, 4 * p)]


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_lowers_to_valid_lists(name):
    for p, m in sizes():
        placement, compute = plan(name, p, m)
        lists = lower(compute, placement, m)
        validate(lists, placement, m)
        assert strip_comm(lists) == compute


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_runs_fewer_microbatches_than_ranks(name):
    for p, m in ((2, 1), (4, 1), (4, 3), (5, 2)):
        placement, compute = plan(name, p, m)
        validate(lower(compute, placement, m), placement, m)


@pytest.mark.parametrize("name", ["Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble"])
def test_looped_schedules_with_three_stages_per_rank(name):
    for p, m in ((2, 2), (2, 5), (3, 7), (4, 4), (4, 9)):
        placement, compute = plan(name, p, m, v=3)
        assert placement == [s % p for s in range(3 * p)]
        validate(lower(compute, placement, m), placement, m)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_timed_lowering_is_valid_and_never_slower(name):
    for p, m in ((2, 5), (4, 8), (4, 16)):
        placement, compute = plan(name, p, m)
        timed = lower(compute, placement, m, costs=DEFAULT_COSTS)
        validate(timed, placement, m)
        assert strip_comm(timed) == compute
        end = max(e.end for e in simulate(timed, placement))
        assert end <= max(e.end for e in simulate(lower(compute, placement, m), placement))


def test_lock_step_lowering_exact_for_1f1b_two_ranks():
    placement, compute = plan("1F1B", 2, 2)
    assert compute_ticks(compute, placement) == {0: [0, 1, 3, 5], 1: [1, 2, 3, 4]}
    assert lower(compute, placement, 2) == {
        0: acts("0F0", "0SEND_F0", "0F1", "0SEND_F1", "0RECV_B0", "0B0", "0RECV_B1", "0B1"),
        1: acts("1RECV_F0", "1F0", "1RECV_F1", "1B0", "1SEND_B0", "1F1", "1B1", "1SEND_B1"),
    }


def test_messages_within_a_rank_get_no_actions():
    placement, compute = plan("Interleaved1F1B", 1, 3)
    assert lower(compute, placement, 3) == compute


def test_skip_edge_lowering_uses_peers_and_validates():
    edges = {0: [1, 2], 1: [2], 2: [3]}
    for name in ("GPipe", "1F1B"):
        placement, compute = plan(name, 4, 6)
        lists = lower(compute, placement, 6, edges)
        validate(lists, placement, 6, edges)
        assert {str(a) for a in lists[0] if a.microbatch == 0 and a.is_comm} == {"0SEND_F0:1", "0SEND_F0:2", "0RECV_B0:1", "0RECV_B0:2"}
        assert {str(a) for a in lists[2] if a.microbatch == 0 and a.is_comm} == {"2RECV_F0:0", "2RECV_F0:1", "2SEND_B0:0", "2SEND_B0:1", "2SEND_F0", "2RECV_B0"}
        assert {str(a) for a in lists[1] if a.microbatch == 0 and a.is_comm} == {"1RECV_F0", "1SEND_F0", "1RECV_B0", "1SEND_B0"}
    # Two stages per rank: the skip 0 -> 2 stays on rank 0, only 0 -> 1 and 1 -> 2 cross ranks.
    placement, compute = plan("Interleaved1F1B", 2, 4)
    lists = lower(compute, placement, 4, edges)
    validate(lists, placement, 4, edges)
    assert {str(a) for a in lists[0] if a.microbatch == 0 and a.is_comm} == {"0SEND_F0", "2RECV_F0", "2SEND_B0", "0RECV_B0", "2SEND_F0", "2RECV_B0"}


def test_forward_only_lists_lower_and_validate():
    placement, compute = plan("ZBVZeroBubble", 2, 3)
    fwd = {r: [a for a in x if a.kind == Kind.F] for r, x in compute.items()}
    lists = lower(fwd, placement, 3)
    validate(lists, placement, 3, forward_only=True)
    assert {a.kind for x in lists.values() for a in x} == {Kind.F, Kind.SEND_F, Kind.RECV_F}


def test_lower_names_stuck_actions_when_the_order_cannot_run():
    with pytest.raises(ScheduleError, match=r"^the compute order can never run: rank 0 is stuck at 0B0 \(needs 0F0, 1B0 or 1I0\); "
                                           r"rank 1 is stuck at 1F0 \(needs 0F0\)$"):
        lower({0: acts("0B0", "0F0"), 1: acts("1F0", "1B0")}, [0, 1], 1)


# ------------------------------------------------------------------------------ validator error classes
def good() -> dict[int, list[Action]]:
    return lower(plan("1F1B", 2, 2)[1], [0, 1], 2)


def broken(edit) -> dict[int, list[Action]]:
    lists = good()
    edit(lists)
    return lists


@pytest.mark.parametrize("edit, message", [
    (lambda x: x[0].insert(0, F(1, 0)), r"rank 0: 1F0 is on the wrong rank: stage 1 lives on rank 1"),
    (lambda x: x[0].remove(F(0, 1)), r"rank 0: stage 0 microbatch 1 has no forward 0F1"),
    (lambda x: x[0].insert(0, x[0].pop(x[0].index(Action.parse("0SEND_F1")))),
     r"rank 0: 0SEND_F1 sends outputs of 0F1 before it was computed"),
    (lambda x: x[1].insert(0, x[1].pop(x[1].index(Action.parse("1SEND_B0")))),
     r"rank 1: 1SEND_B0 sends input gradients of stage 1 microbatch 0 before 1B0/1I0 ran"),
    (lambda x: x[1].insert(2, F(1, 0)), r"rank 1: 1F0 appears more than once"),
    (lambda x: x[0].remove(B(0, 1)), r"rank 0: stage 0 microbatch 1 is missing a backward"),
    (lambda x: x[0].insert(x[0].index(B(0, 1)), I(0, 1)), r"mixes a full backward 0B1 with split 0I1/0W1"),
    (lambda x: x[0].remove(Action.parse("0RECV_B1")) or x[1].remove(Action.parse("1SEND_B1")),
     r"rank 0: 0B1 runs before its output gradient from stage 1 was received"),
    (lambda x: x[1].insert(0, x[1].pop(1)), r"rank 1: 1F0 runs before its input from stage 0 was received"),
    (lambda x: x[1].insert(0, x[1].pop(x[1].index(B(1, 0)))), r"rank 1: 1B0 runs before its forward 1F0"),
    (lambda x: x[1].remove(Action.parse("1RECV_F1")) or x[1].remove(F(1, 1)) or x[1].insert(0, F(1, 1)),
     r"rank 1: 1F1 runs before its input from stage 0 was received"),
    (lambda x: x[1].remove(Action.parse("1RECV_F1")) or x[1].insert(len(x[1]), Action.parse("1RECV_F1")),
     r"rank 1: 1F1 runs before its input from stage 0 was received"),
    (lambda x: x[0].remove(Action.parse("0RECV_B0")) or x[0].append(Action.parse("0RECV_B0")),
     r"rank 0: 0B0 runs before its output gradient from stage 1 was received"),
    (lambda x: x[1].remove(Action.parse("1RECV_F1")) or x[1].insert(x[1].index(F(1, 1)) + 1, Action.parse("1RECV_F1")),
     r"rank 1: 1F1 runs before its input from stage 0 was received"),
    (lambda x: x[1].append(Action.parse("1SEND_B1")), r"rank 1: 1SEND_B1 moves gradients of microbatch 1 from stage 1 to stage 0 a second time"),
    (lambda x: x[0].__setitem__(x[0].index(Action.parse("0RECV_B1")), Action.parse("0RECV_B1:2")),
     r"rank 0: 0RECV_B1:2 names stage 2, which is not a consumer of stage 0 on another rank \(remote consumers: \[1\]\)"),
])
def test_validator_catches_each_error_class(edit, message):
    with pytest.raises(ScheduleError, match=message):
        validate(broken(edit), [0, 1], 2)


def test_validator_catches_unmatched_sends_and_receives():
    lists = good()
    lists[0].remove(Action.parse("0RECV_B1"))
    with pytest.raises(ScheduleError, match="^rank 1: 1SEND_B1 has no matching receive on rank 0 for the gradients of microbatch 1 from stage 1 to stage 0$"):
        run_strict(lists, stage_graph([0, 1]))  # validate() stops earlier: 0B1 lacks its gradient
    lists = good()
    lists[0].remove(Action.parse("0SEND_F0"))
    with pytest.raises(ScheduleError, match="^rank 1: 1RECV_F0 waits for the activations of microbatch 0 from stage 0 to stage 1, which rank 0 never sends$"):
        validate(lists, [0, 1], 2)


def test_validator_catches_w_before_i():
    lists = {0: acts("0F0", "0W0", "0I0")}
    with pytest.raises(ScheduleError, match=r"rank 0: 0W0 runs before its input-gradient step 0I0"):
        validate(lists, [0], 1)
    with pytest.raises(ScheduleError, match=r"rank 0: 0W0 runs before its input-gradient step 0I0"):
        validate_compute(lists, [0], 1)


# Both ranks send first and the sends cross (F one way, B the other), each alone in its batch.
CROSSING = {
    0: ["0F0", "0SEND_F0", "0F1", "0SEND_F1", "0F2", "0RECV_B0", "0B0", "0SEND_F2", "0RECV_B1", "0B1", "0RECV_B2", "0B2"],
    1: ["1RECV_F0", "1F0", "1I0", "1SEND_B0", "1W0", "1RECV_F1", "1F1", "1I1", "1SEND_B1", "1W1", "1RECV_F2", "1F2",
        "1I2", "1SEND_B2", "1W2"],
}


def test_validator_finds_a_real_deadlock_of_crossing_sends():
    with pytest.raises(ScheduleError, match=r"^deadlock: rank 0 is stuck at 0SEND_F1 waiting for rank 1 to reach 1RECV_F1; "
                                            r"rank 1 is stuck at 1SEND_B0 waiting for rank 0 to reach 0RECV_B0$"):
        validate(read_actions(CROSSING), [0, 1], 3)


def test_the_same_crossing_in_one_batch_is_fine():
    fixed = {0: list(CROSSING[0]), 1: list(CROSSING[1])}
    fixed[0].remove("0RECV_B0")
    fixed[0].insert(fixed[0].index("0SEND_F1") + 1, "0RECV_B0")  # 0SEND_F1 and 0RECV_B0 together
    fixed[1].remove("1RECV_F1")
    fixed[1].insert(fixed[1].index("1SEND_B0") + 1, "1RECV_F1")
    validate(read_actions(fixed), [0, 1], 3)


# ---------------------------------------------------------------------------------------- simulate
def test_1f1b_and_gpipe_bubble_match_closed_form():
    # F=1, B=2: every rank works 3m, the makespan is 3(m + p - 1), so the bubble is (p-1)/(m+p-1).
    for name in ("1F1B", "GPipe"):
        for p, m in ((2, 2), (4, 4), (4, 8), (4, 16), (8, 8), (8, 32)):
            placement, compute = plan(name, p, m)
            for lists in (compute, lower(compute, placement, m)):
                events = simulate(lists, placement)
                assert max(e.end for e in events) == 3 * (m + p - 1)
                assert bubble_fraction(events) == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)


def test_bubble_targets_at_four_ranks_sixteen_microbatches():
    got = {}
    for name in SCHEDULES:
        placement, lists = build_lists(name, 4, 16)
        got[name] = bubble_fraction(simulate(lists, placement))
        assert got[name] == pytest.approx(bubble_fraction(simulate(strip_comm(lists), placement)), abs=0.035)
    assert got["1F1B"] == pytest.approx(3 / 19)
    assert got["Interleaved1F1B"] < 0.1
    assert got["InterleavedZeroBubble"] < 0.05 and got["ZBVZeroBubble"] < 0.05
    assert bubble_fraction(simulate(plan("DualPipeV", 4, 16)[1], stage_to_rank("v", 8, 4))) < 0.05


def test_comm_cost_delays_both_models_the_same_for_one_microbatch():
    placement, compute = plan("1F1B", 2, 1)
    for lists in (compute, lower(compute, placement, 1)):
        events = simulate(lists, placement, comm_cost=0.5)
        assert [(str(e.action), e.start, e.end) for e in events] == [
            ("0F0", 0.0, 1.0), ("0B0", 5.0, 7.0), ("1F0", 1.5, 2.5), ("1B0", 2.5, 4.5)]


def test_simulate_takes_costs_and_raises_on_deadlock():
    placement, compute = plan("1F1B", 2, 2)
    events = simulate(compute, placement, costs={Kind.F: 1, Kind.B: 1})
    assert max(e.end for e in events) == 6
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(read_actions(CROSSING), [0, 1])


def test_bubble_fraction_counts_overlaps_once():
    a = Action.parse("0F0")
    events = [TimelineEvent(0, a, 0, 4), TimelineEvent(0, a, 2, 6), TimelineEvent(1, a, 4, 8)]
    assert bubble_fraction(events) == pytest.approx(1 - (6 + 4) / (2 * 8))
    assert bubble_fraction([]) == 0.0


def test_from_chrome_trace_reads_action_events(tmp_path):
    trace = {"traceEvents": [
        {"name": "0F0", "ph": "X", "ts": 1000.0, "dur": 10.0, "pid": 0, "tid": 0},
        {"name": "1F0", "ph": "X", "ts": 1012.0, "dur": 10.0, "pid": 1, "tid": 0},
        {"name": "optimizer", "ph": "X", "ts": 1030.0, "dur": 5.0, "pid": 0, "tid": 0},
        {"name": "0B0", "ph": "B", "ts": 1040.0, "pid": 0, "tid": 0},
        {"name": "0B0", "ph": "X", "ts": 1050.0, "dur": 20.0, "pid": 0, "tid": 0},
    ]}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    assert [(e.rank, str(e.action), e.start, e.end) for e in from_chrome_trace(path)] == [
        (0, "0F0", 0.0, 10.0), (0, "0B0", 50.0, 70.0), (1, "1F0", 12.0, 22.0)]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read Chrome trace"):
        from_chrome_trace(path)


# ------------------------------------------------------------------------------------------------ CSV
def test_csv_round_trip(tmp_path):
    placement, lists = build_lists("DualPipeV", 2, 4)
    path = tmp_path / "dualpipev.csv"
    write_actions(lists, path)
    assert read_actions(path) == lists
    assert read_actions(str(path)) == lists
    assert path.read_text().splitlines()[0].startswith("0F0,0SEND_F0,")


def test_csv_ignores_blank_cells_and_takes_dicts_and_rows(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("0F0,,0B0\n1F0, ,1B0,\n")
    assert read_actions(path) == {0: acts("0F0", "0B0"), 1: acts("1F0", "1B0")}
    assert read_actions({1: ["1F0"], 0: ["0F0"]}) == {0: acts("0F0"), 1: acts("1F0")}
    assert read_actions([["0F0", ""], ["1F0"]]) == {0: acts("0F0"), 1: acts("1F0")}


def test_csv_bad_cell_names_row_column_and_text(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("0F0,0B0\n1F0,1B0,1X3\n")
    with pytest.raises(ValueError, match=r"bad.csv: rank 1 \(row 2\), column 3: cannot read schedule action '1X3': expected"):
        read_actions(path)
    with pytest.raises(ValueError, match=r"rank 0 \(row 1\), column 2: cannot read schedule action '0F': expected"):
        read_actions([["0F0", "0F"]])
    with pytest.raises(ValueError, match="cannot read schedule CSV"):
        read_actions(tmp_path / "missing.csv")
