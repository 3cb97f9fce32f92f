"""Run action lists on a cost model, without processes, to time them and measure the pipeline bubble;
also read the timeline of a real run back from its Chrome trace."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

from pp.schedules.actions import Action, Kind
from pp.schedules.validate import Edges, asap_times, run_strict, stage_graph

DEFAULT_COSTS: dict[Kind, float] = {Kind.F: 1.0, Kind.B: 2.0, Kind.I: 1.0, Kind.W: 1.0}


class TimelineEvent(NamedTuple):
    """One compute action of one rank, from `start` to `end` (cost units, or µs for a recorded trace)."""

    rank: int
    action: Action
    start: float
    end: float


def simulate(
    lists: Mapping[int, Sequence[Action]],
    stage_to_rank: Sequence[int],
    costs: Mapping[Kind, float] | None = None,
    edges: Edges | None = None,
    comm_cost: float = 0.0,
    stage_costs: Mapping[int, Mapping[Kind, float]] | None = None,
) -> list[TimelineEvent]:
    """Time compute actions under a cost model (default F=1, B=2, I=1, W=1); events sorted by (rank, start).

    `stage_costs` ({stage: {kind: duration}}) gives each stage its own durations (measured per stage,
    e.g. by `pp.tune`); a stage or kind it leaves out takes the per-kind `costs`.

    Lowered lists (with send/recv) run under the strict batched model, where each message costs
    `comm_cost` once both sides posted it; compute-only lists run as soon as inputs allow, each
    cross-rank input arriving `comm_cost` after it was produced. Raises ScheduleError on deadlock.
    """
    table = dict(DEFAULT_COSTS)
    if costs:
        for kind, value in costs.items():
            kind = Kind(kind)
            if kind not in DEFAULT_COSTS or not value >= 0:
                raise ValueError(f"costs must map F/B/I/W to numbers >= 0, got {kind}={value!r}")
            table[kind] = float(value)
    if comm_cost < 0:
        raise ValueError(f"comm_cost must be >= 0, got {comm_cost!r}")
    graph = stage_graph(stage_to_rank, edges)
    per_stage: dict[int, dict[Kind, float]] = {}
    for stage, kinds in (stage_costs or {}).items():
        per_stage[int(stage)] = {}
        for kind, value in kinds.items():
            if Kind(kind) not in DEFAULT_COSTS or not value >= 0:
                raise ValueError(f"stage_costs[{stage}] must map F/B/I/W to numbers >= 0, got {kind}={value!r}")
            per_stage[int(stage)][Kind(kind)] = float(value)

    def duration(a: Action) -> float:
        if not a.is_compute:
            return 0.0
        return per_stage.get(a.stage, table).get(a.kind, table[a.kind])

    lowered = any(a.is_comm for acts in lists.values() for a in acts)
    times = run_strict(lists, graph, duration, comm_cost) if lowered else asap_times(lists, graph, duration, comm_cost)
    return [
        TimelineEvent(r, a, start, end)
        for r in sorted(times)
        for a, (start, end) in zip(lists.get(r, ()), times[r])
        if a.is_compute
    ]


def bubble_fraction(events: Iterable[TimelineEvent], n_ranks: int | None = None) -> float:
    """1 - busy / (n_ranks * makespan): the share of rank-time spent idle. Only compute events count;
    `n_ranks` defaults to the number of ranks that appear in the events."""
    events = [e for e in events if e.action.is_compute]
    if not events:
        return 0.0
    ranks = n_ranks if n_ranks is not None else len({e.rank for e in events})
    makespan = max(e.end for e in events) - min(e.start for e in events)
    if makespan <= 0:
        return 0.0
    busy = 0.0
    for r in {e.rank for e in events}:  # merge overlaps so nested or overlapped spans count once
        reach = float("-inf")
        for e in sorted((e for e in events if e.rank == r), key=lambda e: e.start):
            if e.end > reach:
                busy += e.end - max(e.start, reach)
                reach = e.end
    return 1.0 - busy / (ranks * makespan)


def from_chrome_trace(path: str | Path) -> list[TimelineEvent]:
    """Read the complete ("X") events of a Chrome trace whose names are actions (``2F5``); the rank is the
    event's pid, or its tid where all share one pid (`rank_field`); times are µs from the first such
    event. Other events are ignored."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read Chrome trace {str(path)!r}: {err}") from None
    raw = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(raw, list):
        raise ValueError(f"Chrome trace {str(path)!r} has no 'traceEvents' list")
    found = []
    key = rank_field([ev for ev in raw if isinstance(ev, dict) and ev.get("ph") == "X"])
    for ev in raw:
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue
        try:
            action = Action.parse(ev.get("name", ""))
            rank, start, dur = int(ev[key]), float(ev["ts"]), float(ev.get("dur", 0.0))
        except (ValueError, KeyError, TypeError):
            continue
        found.append((rank, action, start, start + dur))
    if not found:
        return []
    origin = min(f[2] for f in found)
    return sorted((TimelineEvent(r, a, s - origin, e - origin) for r, a, s, e in found), key=lambda e: (e.rank, e.start))


def rank_field(events: list[dict]) -> str:
    """Which field of a Chrome trace's events holds the rank: "pid" (a process per rank, as
    `schedule.write_trace` writes), or "tid" where every event shares one pid and the tids differ
    (pp.run's trace.json: one process, a row per rank)."""
    pids, tids = {ev.get("pid") for ev in events}, {ev.get("tid") for ev in events}
    return "tid" if len(pids) == 1 and len(tids) > 1 else "pid"
