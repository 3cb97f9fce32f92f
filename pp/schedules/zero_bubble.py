"""Zero-bubble compute orders (Qi et al. 2023), found by a greedy list scheduler over a simulated clock.

The backward is split into I (input grads, on the critical path) and W (weight grads, free to move):
each idle rank picks, by priority, a ready I, else a ready F while it holds fewer than its limit of
activations, else a deferred W, so W's fill the bubbles 1F1B would leave. A cap on deferred W's bounds
the memory they hold.
"""
from __future__ import annotations

from collections import deque

from pp.schedules.actions import Action, B, F, I, W
from pp.schedules.families import check_sizes, loop_placement, v_placement

_COST = {"F": 1, "B": 2, "I": 1, "W": 1}


def list_schedule(
    stage_to_rank: list[int],
    n_microbatches: int,
    max_in_flight: list[int],
    max_deferred: list[int] | None = None,
    soft_deferred: list[int] | None = None,
    split_backward: bool = True,
    hold_until_weight: bool = False,
) -> tuple[dict[int, list[Action]], int]:
    """Greedy compute order for a chain of stages; priorities I/B > F > W, lowest microbatch (then the
    deeper stage) first. Rank r holds at most `max_in_flight[r]` activations (F ran, I/B not yet; with
    `hold_until_weight`, W not yet: W needs most of them, so that is what memory holds) and
    defers at most `max_deferred[r]` W's (I ran, W not yet; default: no limit): at that limit a W goes
    before anything else; from `soft_deferred[r]` on, a W goes before F's. If every rank is blocked only
    by the activation limit, one F may exceed it, so the schedule always completes.
    Returns the lists and their makespan (F=I=W=1, B=2)."""
    n_stages, n_ranks, n = len(stage_to_rank), max(stage_to_rank) + 1, n_microbatches
    local = [[s for s in range(n_stages) if stage_to_rank[s] == r] for r in range(n_ranks)]
    f_end = [[None] * n for _ in range(n_stages)]
    g_end = [[None] * n for _ in range(n_stages)]  # end of B or I: output grads of the stage's inputs
    next_f, next_g = [0] * n_stages, [0] * n_stages
    weights: list[deque[tuple[int, int]]] = [deque() for _ in range(n_ranks)]
    in_flight, free_at = [0] * n_ranks, [0] * n_ranks
    out: dict[int, list[Action]] = {r: [] for r in range(n_ranks)}
    left = n_stages * n * (3 if split_backward else 2)

    def pick(r: int, t: int, over_limit: bool) -> Action | None:
        w_ready = bool(weights[r]) and g_end[weights[r][0][0]][weights[r][0][1]] <= t
        if w_ready and max_deferred is not None and len(weights[r]) >= max_deferred[r]:
            return W(*weights[r][0])
        grads = [(m, -s) for s in local[r] for m in [next_g[s]]
                 if m < n and f_end[s][m] is not None and f_end[s][m] <= t
                 and (s == n_stages - 1 or (g_end[s + 1][m] is not None and g_end[s + 1][m] <= t))]
        if grads:
            m, s = min(grads)
            return (I if split_backward else B)(-s, m)
        if w_ready and soft_deferred is not None and len(weights[r]) >= soft_deferred[r]:
            return W(*weights[r][0])
        if in_flight[r] < max_in_flight[r] or over_limit:
            fwds = [(m, -s) for s in local[r] for m in [next_f[s]]
                    if m < n and (s == 0 or (f_end[s - 1][m] is not None and f_end[s - 1][m] <= t))]
            if fwds:
                m, s = min(fwds)
                return F(-s, m)
        return W(*weights[r][0]) if w_ready else None

    t = 0
    while left:
        started = False
        for over_limit in (False, True):
            for r in range(n_ranks):
                if free_at[r] <= t and (a := pick(r, t, over_limit)) is not None:
                    s, m, kind = a.stage, a.microbatch, a.kind.value
                    end = free_at[r] = t + _COST[kind]
                    if kind == "F":
                        f_end[s][m], next_f[s] = end, m + 1
                        in_flight[r] += 1
                    elif kind in "BI":
                        g_end[s][m], next_g[s] = end, m + 1
                        if kind == "I":
                            weights[r].append((s, m))
                        if kind == "B" or not hold_until_weight:
                            in_flight[r] -= 1
                    if kind == "W":
                        weights[r].popleft()
                        if hold_until_weight:
                            in_flight[r] -= 1
                    out[r].append(a)
                    left -= 1
                    started = True
                    if over_limit:
                        break
            if started or any(f > t for f in free_at):
                break
        later = [f for f in free_at if f > t]
        t = min(later) if later else t + 1
    return out, max(free_at)


def best_list_schedule(
    stage_to_rank: list[int], n_microbatches: int, max_in_flight: list[int], max_deferred: int,
    hold_until_weight: bool = False,
) -> dict[int, list[Action]]:
    """The shortest of a few greedy runs that all keep the same limits (deferred W's at most
    `max_deferred`, with or without a softer limit at half of it): greedy list scheduling is sensitive
    to such details, and trying a few costs little."""
    n_ranks = len(max_in_flight)
    best = None
    for soft in (None, max(1, max_deferred // 2), max(1, max_deferred // 4)):
        lists, span = list_schedule(stage_to_rank, n_microbatches, max_in_flight, [max_deferred] * n_ranks,
                                    None if soft is None else [soft] * n_ranks,
                                    hold_until_weight=hold_until_weight)
        if best is None or span < best[1]:
            best = (lists, span)
    return best[0]


def interleaved_zero_bubble(n_stages: int, n_ranks: int, n_microbatches: int) -> dict[int, list[Action]]:
    """Loop placement with v >= 2 stages per rank, I/W split, W's deferred into bubbles. Like ZB-H1, rank r
    holds no more activations than interleaved 1F1B ((v-1)p + p-r, against its 2(p-r-1) + (v-1)p + 1),
    plus at most 2p deferred W's (I done, W not yet)."""
    v = check_sizes("InterleavedZeroBubble", n_stages, n_ranks, n_microbatches, None)
    limit = [(v - 1) * n_ranks + n_ranks - r for r in range(n_ranks)]
    return best_list_schedule(loop_placement(n_stages, n_ranks), n_microbatches, limit, 2 * n_ranks)


def zbv_zero_bubble(n_stages: int, n_ranks: int, n_microbatches: int) -> dict[int, list[Action]]:
    """ZB-V: V placement (rank r holds stages r and 2p-1-r), I/W split, at most 2p microbatches in flight
    per rank from F to W (each half a rank's layers: 1F1B's peak, as in the paper), so W's run soon
    after their I's and fill the bubbles only where there are some."""
    check_sizes("ZBVZeroBubble", n_stages, n_ranks, n_microbatches, 2)
    return best_list_schedule(v_placement(n_stages, n_ranks), n_microbatches, [2 * n_ranks] * n_ranks, 2 * n_ranks,
                              hold_until_weight=True)
