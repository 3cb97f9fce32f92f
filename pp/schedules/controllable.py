"""V-shaped zero-bubble schedules with controllable memory, after Qi et al., "Pipeline Parallelism with
Controllable Memory" (NeurIPS 2024): ZBVHalf and ZBVMin hold about 1/2 and 1/3 of 1F1B's activations.

V placement (rank r holds stages r and 2p-1-r, each half of what a 1F1B stage holds), F/I/W split. The
paper builds a schedule by repeating one building block (one microbatch's F, I and W on every stage)
every `interval` time units; the block's lifespan on a rank over the interval is that rank's peak
memory. Here the block gives every action a target time (microbatch m enters at m * interval, its F's go
down the V one unit apart, its I's come back up, each W `w_delay` after its I), and a greedy list
scheduler on a unit-cost clock (F=I=W=1) runs, on each idle rank, the ready action with the earliest
target, under a hard cap on the rank's live activations (a microbatch's activation on a stage lives
from its F until its W). A microbatch enters a rank's first stage no earlier than its target (an F run
early only holds memory longer) and only while a slot stays free for the second stage, so the V never
blocks itself. A few (interval, w_delay, gating) choices are tried and the shortest schedule kept.
This greedy search reproduces the paper's memory but not all of its bubble: see docs/schedules.md.
"""
from __future__ import annotations

import heapq
import itertools

from pp.schedules.actions import Action, F, I, W
from pp.schedules.families import check_sizes

Lists = dict[int, list[Action]]


def capped_v_schedule(n_ranks: int, n_microbatches: int, cap: int, interval: int, w_delay: int = 0,
                      gate_all: bool = False,
                      ) -> tuple[Lists, int] | None:
    """Greedy compute order for the V placement on `n_ranks` ranks with at most `cap` (>= 2) live
    activations per rank (F done, W not yet), targets from the building block repeated every
    `interval` units. Returns (lists per rank, makespan at F=I=W=1), or None where the cap stalls it."""
    p, n, n_stages = n_ranks, n_microbatches, 2 * n_ranks
    local = [(r, n_stages - 1 - r) for r in range(p)]
    f_end = [[None] * n for _ in range(n_stages)]
    i_end = [[None] * n for _ in range(n_stages)]
    next_f, next_i = [0] * n_stages, [0] * n_stages
    pending_w: list[list[tuple[int, int, int]]] = [[] for _ in range(p)]  # heap of (target, stage, mb)
    live, free_at = [0] * p, [0] * p
    out: Lists = {r: [] for r in range(p)}
    left = n_stages * n * 3

    def target_f(s: int, m: int) -> int:
        return m * interval + s

    def target_i(s: int, m: int) -> int:
        return m * interval + 2 * n_stages - 1 - s

    def pick(r: int, t: int) -> Action | None:
        cands = []
        for s in local[r]:
            m = next_i[s]
            if (m < n and f_end[s][m] is not None and f_end[s][m] <= t
                    and (s == n_stages - 1 or (i_end[s + 1][m] is not None and i_end[s + 1][m] <= t))):
                cands.append((target_i(s, m), 0, I(s, m)))
            m = next_f[s]
            room = cap if s >= p else cap - 1  # a new microbatch leaves a slot for its second stage
            if (m < n and live[r] < room and (s != (r if gate_all else 0) or t >= target_f(s, m))
                    and (s == 0 or (f_end[s - 1][m] is not None and f_end[s - 1][m] <= t))):
                cands.append((target_f(s, m), 1, F(s, m)))
        if pending_w[r] and i_end[pending_w[r][0][1]][pending_w[r][0][2]] <= t:
            tgt, s, m = pending_w[r][0]
            cands.append((tgt, 2, W(s, m)))
        return min(cands)[2] if cands else None

    t = 0
    while left:
        for r in range(p):
            if free_at[r] <= t and (a := pick(r, t)) is not None:
                s, m = a.stage, a.microbatch
                free_at[r] = t + 1
                if a.kind.value == "F":
                    f_end[s][m], next_f[s] = t + 1, m + 1
                    live[r] += 1
                elif a.kind.value == "I":
                    i_end[s][m], next_i[s] = t + 1, m + 1
                    heapq.heappush(pending_w[r], (target_i(s, m) + 1 + w_delay, s, m))
                else:
                    heapq.heappop(pending_w[r])
                    live[r] -= 1
                out[r].append(a)
                left -= 1
        later = [f for f in free_at if f > t]
        if not later and left:
            return None
        t = min(later) if later else t
    return out, max(free_at)


def _best(name: str, n_stages: int, n_ranks: int, n_microbatches: int, cap: int) -> Lists:
    check_sizes(name, n_stages, n_ranks, n_microbatches, 2)
    best = None
    for interval in range(3, 8):
        for w_delay, gate_all in itertools.product((0, 2, n_ranks), (False, True)):
            got = capped_v_schedule(n_ranks, n_microbatches, cap, interval, w_delay, gate_all)
            if got is not None and (best is None or got[1] < best[1]):
                best = got
    if best is None:  # not seen for any size tested; the cap-2 block runs one microbatch at a time
        best = capped_v_schedule(n_ranks, n_microbatches, 2, 6 * n_ranks)
    if best is None:
        raise ValueError(f"{name} found no schedule for n_ranks={n_ranks}, n_microbatches={n_microbatches} "
                         f"under {cap} live activations per rank")
    return best[0]


def zbv_half_cap(n_ranks: int) -> int:
    """Live V-stage activations per rank for ZBVHalf: p + 1, i.e. (p + 1) / 2p of 1F1B's 2p."""
    return n_ranks + 1


def zbv_min_cap(n_ranks: int) -> int:
    """Live V-stage activations per rank for ZBVMin: ceil(2p / 3) + 1, about 1/3 of 1F1B's 2p."""
    return -(-2 * n_ranks // 3) + 1


def zbv_half(n_stages: int, n_ranks: int, n_microbatches: int) -> Lists:
    """ZB-V with half memory (the paper's V-Half): V placement, I/W split, at most p + 1 live activations
    of half a 1F1B stage each per rank (1F1B: 2p)."""
    return _best("ZBVHalf", n_stages, n_ranks, n_microbatches, zbv_half_cap(n_ranks))


def zbv_min(n_stages: int, n_ranks: int, n_microbatches: int) -> Lists:
    """ZB-V with minimal memory (the paper's V-Min): V placement, I/W split, at most ceil(2p/3) + 1 live
    activations of half a 1F1B stage each per rank (1F1B: 2p)."""
    return _best("ZBVMin", n_stages, n_ranks, n_microbatches, zbv_min_cap(n_ranks))
