"""Lower compute-only lists to runnable ones by inserting SEND/RECV actions.

Lock-step: each compute action gets its as-soon-as-possible tick (unit time per action); a message is
sent by the producer's rank and received by the consumer's rank at the same boundary, right after the
tick of the compute that produced it, both sides listing a boundary's messages in one canonical order.
The result is deadlock-free under the strict batched model (see validate.py), and also when each
send/recv is run as a blocking call in list order. With a cost model, a timed "rendezvous" placement
can replace it where it runs faster.
"""
from __future__ import annotations

import bisect
from typing import Callable, Mapping, Sequence

from pp.schedules.actions import Action, Kind
from pp.schedules.validate import (
    Edges,
    Message,
    ScheduleError,
    StageGraph,
    asap_times,
    run_strict,
    stage_graph,
    validate_compute,
)


def compute_ticks(
    compute: Mapping[int, Sequence[Action]], stage_to_rank: Sequence[int], edges: Edges | None = None
) -> dict[int, list[int]]:
    """The lock-step tick of every compute action, per rank in list order; ScheduleError if the order is stuck."""
    graph = stage_graph(stage_to_rank, edges)
    times = asap_times(compute, graph, lambda a: 1.0)
    return {r: [int(start) for start, _ in spans] for r, spans in times.items()}


def _endpoints(m: Message, graph: StageGraph) -> tuple[Action, Action]:
    """The (send, recv) action pair for one message; `peer` only where the stage has several remote peers."""
    if not m.backward:
        p, c = m.src, m.dst
        send = Action(p, Kind.SEND_F, m.microbatch, c if len(graph.remote_consumers(p)) > 1 else None)
        recv = Action(c, Kind.RECV_F, m.microbatch, p if len(graph.remote_producers(c)) > 1 else None)
    else:
        c, p = m.src, m.dst
        send = Action(c, Kind.SEND_B, m.microbatch, p if len(graph.remote_producers(c)) > 1 else None)
        recv = Action(p, Kind.RECV_B, m.microbatch, c if len(graph.remote_consumers(p)) > 1 else None)
    return send, recv


def _messages(a: Action, graph: StageGraph) -> tuple[list[Message], list[Message]]:
    """(messages compute action `a` needs from other ranks, messages it produces for other ranks)."""
    s, mb = a.stage, a.microbatch
    if a.kind == Kind.F:
        return ([Message(False, p, s, mb) for p in graph.remote_producers(s)],
                [Message(False, s, c, mb) for c in graph.remote_consumers(s)])
    if a.kind in (Kind.B, Kind.I):
        return ([Message(True, c, s, mb) for c in graph.remote_consumers(s)],
                [Message(True, s, p, mb) for p in graph.remote_producers(s)])
    return [], []


def _side(m: Message, rank: int, graph: StageGraph) -> Action:
    send, recv = _endpoints(m, graph)
    return send if graph.stage_to_rank[send.stage] == rank else recv


def _assemble(
    compute: Mapping[int, Sequence[Action]], graph: StageGraph, placed: dict[int, list[tuple[float, Message, int]]]
) -> dict[int, list[Action]]:
    """Build lists from comm placements (order key, message, index of the compute it must precede)."""
    out: dict[int, list[Action]] = {}
    for r in range(graph.n_ranks):
        items = sorted(placed[r], key=lambda item: (item[2], item[0], item[1]))
        acts, k, lowered = compute.get(r, ()), 0, []
        for i, a in enumerate(acts):
            while k < len(items) and items[k][2] <= i:
                lowered.append(_side(items[k][1], r, graph))
                k += 1
            lowered.append(a)
        lowered += [_side(item[1], r, graph) for item in items[k:]]
        out[r] = lowered
    return out


def _lock_step(compute: Mapping[int, Sequence[Action]], graph: StageGraph) -> dict[int, list[tuple[float, Message, int]]]:
    """Each message at the boundary right after the unit-time tick of the compute that produced it."""
    ticks = asap_times(compute, graph, lambda a: 1.0)
    placed: dict[int, list[tuple[float, Message, int]]] = {r: [] for r in range(graph.n_ranks)}
    first_after: dict[int, list[float]] = {r: [start for start, _ in ticks[r]] for r in ticks}
    for r, acts in compute.items():
        for a, (_, end) in zip(acts, ticks[r]):
            for m in _messages(a, graph)[1]:
                for side in (r, graph.stage_to_rank[m.dst]):
                    placed[side].append((end, m, bisect.bisect_left(first_after[side], end)))
    return placed


def _rendezvous(
    compute: Mapping[int, Sequence[Action]], graph: StageGraph, duration: Callable[[Action], float]
) -> dict[int, list[tuple[float, Message, int]]]:
    """Place each message where its two ranks meet in a timed run of the strict model.

    A rank between computes posts the receives its next compute needs, joins every message whose other
    side is already posted, and exchanges produced messages with ranks that are between computes at the
    same moment; a waiting rank's open batch takes in messages that others post meanwhile. Every wait
    is then for data some compute needs, so the run (and the strict model) cannot deadlock.
    """
    ranks = range(graph.n_ranks)
    acts = {r: list(compute.get(r, ())) for r in ranks}
    idx = {r: 0 for r in ranks}
    busy: dict[int, float | None] = {r: None for r in ranks}  # end of the running compute
    waiting: dict[int, set[Message]] = {r: set() for r in ranks}  # own side posted, other side not yet
    pending: dict[int, set[Message]] = {r: set() for r in ranks}  # produced, own side not posted
    posted: dict[Message, dict[int, int]] = {}  # message -> {rank: compute index its side precedes}
    placed: dict[int, list[tuple[float, Message, int]]] = {r: [] for r in ranks}
    needs = {r: [_messages(a, graph)[0] for a in acts[r]] for r in ranks}

    def other(m: Message, r: int) -> int:
        a, b = graph.stage_to_rank[m.src], graph.stage_to_rank[m.dst]
        return b if r == a else a

    def post(m: Message, r: int, x: float) -> None:
        sides = posted.setdefault(m, {})
        sides[r] = idx[r]
        pending[r].discard(m)
        q = other(m, r)
        if q in sides:
            waiting[q].discard(m)
            for side, pos in sides.items():
                placed[side].append((x, m, pos))
        else:
            waiting[r].add(m)

    x = 0.0
    while True:
        changed = True
        while changed:  # exchange messages among ranks that are between computes at time x
            changed = False
            for r in ranks:
                if busy[r] is not None:
                    continue
                nxt = acts[r][idx[r]] if idx[r] < len(acts[r]) else None
                want = [m for m in (needs[r][idx[r]] if nxt else []) if r not in posted.get(m, {})]
                for m in sorted(pending[r]):
                    q = other(m, r)
                    if q in posted.get(m, {}) or busy[q] is None:
                        want.append(m)
                        if q not in posted.get(m, {}):
                            post(m, q, x)
                for m in want:
                    if r not in posted.get(m, {}):
                        post(m, r, x)
                        changed = True
        for r in ranks:  # start the computes whose inputs all arrived
            if busy[r] is None and not waiting[r] and idx[r] < len(acts[r]):
                busy[r] = x + duration(acts[r][idx[r]])
                idx[r] += 1
        running = [busy[r] for r in ranks if busy[r] is not None]
        if not running:
            break
        x = min(running)
        for r in ranks:
            if busy[r] == x:
                busy[r] = None
                for m in _messages(acts[r][idx[r] - 1], graph)[1]:
                    for side in (r, other(m, r)):
                        if side not in posted.get(m, {}):
                            pending[side].add(m)
    if any(idx[r] < len(acts[r]) or waiting[r] for r in ranks):
        raise ScheduleError("rendezvous lowering got stuck")
    return placed


def lower(
    compute: Mapping[int, Sequence[Action]],
    stage_to_rank: Sequence[int],
    n_microbatches: int,
    edges: Edges | None = None,
    costs: Mapping[Kind, float] | None = None,
) -> dict[int, list[Action]]:
    """Insert SEND_F/RECV_F/SEND_B/RECV_B into compute-only lists; messages within one rank get no action.

    Lock-step (the default): after a rank's compute at unit-time tick t come all of that rank's messages
    of boundary t, sorted by (forward before backward, sending stage, receiving stage, microbatch); a
    rank that computes nothing at tick t still gets them, before its next compute.
    With `costs` (F/B/I/W durations), messages are placed where the two ranks meet in a timed run
    instead, when that runs faster under those costs: B taking longer than F makes lock-step ranks wait
    for each other. Either way the lists are deadlock-free under the strict model; lock-step lists are
    also safe when each send/recv is a blocking call in list order. Lists of F's only (evaluation) get
    forward messages only.
    """
    forward_only = not any(a.kind != Kind.F for acts in compute.values() for a in acts)
    validate_compute(compute, stage_to_rank, n_microbatches, edges, forward_only)
    graph = stage_graph(stage_to_rank, edges)
    lock_step = _assemble(compute, graph, _lock_step(compute, graph))
    if costs is None:
        return lock_step
    table = {Kind(k): float(v) for k, v in costs.items()}
    if any(not v >= 0 for v in table.values()):
        raise ValueError(f"costs must be durations >= 0, got {dict(costs)!r}")
    missing = {a.kind for acts in compute.values() for a in acts} - set(table)
    if missing:
        raise ValueError(f"costs give no duration for {', '.join(sorted(k.value for k in missing))}")

    def duration(a: Action) -> float:
        return table[a.kind] if a.is_compute else 0.0

    def makespan(lists: dict[int, list[Action]]) -> float:
        return max((end for spans in run_strict(lists, graph, duration).values() for _, end in spans), default=0.0)

    try:
        met = _assemble(compute, graph, _rendezvous(compute, graph, duration))
        return met if makespan(met) < makespan(lock_step) else lock_step
    except ScheduleError:  # not expected; lock-step is always a safe answer
        return lock_step


def strip_comm(lists: Mapping[int, Sequence[Action]]) -> dict[int, list[Action]]:
    """The compute-only part of lowered lists (what a generator produced)."""
    return {r: [a for a in acts if a.is_compute] for r, acts in lists.items()}


__all__ = ["ScheduleError", "compute_ticks", "lower", "strip_comm"]
