"""V-shaped zero-bubble schedules with controllable memory (Qi et al., "Pipeline Parallelism with
Controllable Memory", NeurIPS 2024): ZBVHalf and ZBVMin hold about 1/2 and 1/3 of 1F1B's activations.

V placement (rank r holds stages r and 2p-1-r, each half of what a 1F1B stage holds), F/I/W split. A
greedy list scheduler over a unit-cost clock (F=I=W=1) keeps each rank's live activations (a microbatch's
activation on a stage lives from its F until its W) under a cap: 1F1B's peak is p full stages = 2p
V-stages on rank 0, so ZBVHalf caps at p and ZBVMin at ceil(2p/3). Priorities follow the paper's
building block: a ready I first (it is on the critical path back up the V), then the F of the second
(deeper) stage, then a new microbatch's F on the first stage, which must leave one slot free for the
second stage so the V never blocks itself; W's fill what is left and free memory. The memory therefore
falls with a larger repeating interval between microbatches, as in the paper, while the bubble grows
only by the warm-up and cool-down.
"""
from __future__ import annotations

from collections import deque

from pp.schedules.actions import Action, F, I, W
from pp.schedules.families import check_sizes, v_placement


def capped_v_schedule(n_ranks: int, n_microbatches: int, cap: int, interval: int = 0,
                      ) -> tuple[dict[int, list[Action]], int]:
    """Greedy compute order for the V placement on `n_ranks` ranks with at most `cap` (>= 2) live
    activations per rank (F done, W not yet); rank 0 starts microbatch m no earlier than m * `interval`
    (the paper's repeating interval of the building block; 0: as soon as the cap allows). Returns (lists per rank, makespan at F=I=W=1).

    Raises ValueError if the cap is below 2 (the V needs one slot per stage of a rank)."""
    if cap < 2:
        raise ValueError(f"capped_v_schedule needs cap >= 2 live activations per rank, got {cap!r}")
    p, n = n_ranks, n_microbatches
    n_stages = 2 * p
    owner = v_placement(n_stages, p)
    local = [[r, n_stages - 1 - r] for r in range(p)]
    f_end = [[None] * n for _ in range(n_stages)]
    i_end = [[None] * n for _ in range(n_stages)]
    next_f, next_i = [0] * n_stages, [0] * n_stages
    weights: list[deque[tuple[int, int]]] = [deque() for _ in range(p)]
    live, free_at = [0] * p, [0] * p
    out: dict[int, list[Action]] = {r: [] for r in range(p)}
    left = n_stages * n * 3

    def ready_f(s: int, t: int) -> int | None:
        m = next_f[s]
        if m < n and (s == 0 or (f_end[s - 1][m] is not None and f_end[s - 1][m] <= t)):
            return m
        return None

    def pick(r: int, t: int) -> Action | None:
        grads = [(m, -s) for s in local[r] for m in [next_i[s]]
                 if m < n and f_end[s][m] is not None and f_end[s][m] <= t
                 and (s == n_stages - 1 or (i_end[s + 1][m] is not None and i_end[s + 1][m] <= t))]
        if grads:
            m, s = min(grads)
            return I(-s, m)
        first, second = local[r]
        if live[r] < cap and (m := ready_f(second, t)) is not None:
            return F(second, m)
        if live[r] < cap - 1 and (m := ready_f(first, t)) is not None and (r or t >= m * interval):
            # a new microbatch on the first stage must leave room for one on the second stage
            return F(first, m)
        if weights[r] and i_end[weights[r][0][0]][weights[r][0][1]] <= t:
            return W(*weights[r][0])
        return None

    t = 0
    while left:
        for r in range(p):
            if free_at[r] <= t and (a := pick(r, t)) is not None:
                s, m = a.stage, a.microbatch
                end = free_at[r] = t + 1
                if a.kind.value == "F":
                    f_end[s][m], next_f[s] = end, m + 1
                    live[r] += 1
                elif a.kind.value == "I":
                    i_end[s][m], next_i[s] = end, m + 1
                    weights[r].append((s, m))
                else:
                    weights[r].popleft()
                    live[r] -= 1
                out[r].append(a)
                left -= 1
        later = [f for f in free_at if f > t]
        if not later and left and next_f[0] < n and t < next_f[0] * interval:
            later = [next_f[0] * interval]
        if not later and left:
            # nothing runs and nothing will finish: the cap admits no progress
            raise ValueError(f"a cap of {cap} live activations per rank deadlocks the V on {p} ranks")
        t = min(later) if later else t
    return out, max(free_at)
