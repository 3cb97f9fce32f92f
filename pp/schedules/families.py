"""Compute orders of the classic schedules: GPipe, 1F1B, interleaved 1F1B, looped BFS and DualPipeV.

Each generator takes (n_stages, n_ranks, n_microbatches) and returns {rank: [F/B/I/W actions]} in the
order that rank runs them; lower.py adds the communication. The zero-bubble family is in zero_bubble.py.
"""
from __future__ import annotations

from collections import deque

from pp.schedules.actions import Action, B, F, I, W

Lists = dict[int, list[Action]]


def loop_placement(n_stages: int, n_ranks: int) -> list[int]:
    """Stage s on rank s % n_ranks (stages 0..p-1 on ranks 0..p-1, then again)."""
    return [s % n_ranks for s in range(n_stages)]


def v_placement(n_stages: int, n_ranks: int) -> list[int]:
    """Rank r holds stages r and 2p-1-r, so the model goes down the ranks and back up (a 'V')."""
    return [s if s < n_ranks else 2 * n_ranks - 1 - s for s in range(n_stages)]


def check_sizes(name: str, n_stages: int, n_ranks: int, n_microbatches: int, stages_per_rank: int | None) -> int:
    """Check the sizes a generator was given; return the number of stages per rank."""
    for what, value in (("n_stages", n_stages), ("n_ranks", n_ranks), ("n_microbatches", n_microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} needs {what} to be an integer >= 1, got {value!r}")
    if stages_per_rank is None:
        if n_stages % n_ranks:
            raise ValueError(
                f"{name} needs n_stages to be a multiple of n_ranks (one or more stages per rank), "
                f"got n_stages={n_stages} for n_ranks={n_ranks}"
            )
    elif n_stages != stages_per_rank * n_ranks:
        raise ValueError(
            f"{name} needs {stages_per_rank} stage(s) per rank, i.e. n_stages={stages_per_rank * n_ranks} "
            f"for n_ranks={n_ranks}, got n_stages={n_stages}"
        )
    return n_stages // n_ranks


def gpipe(n_stages: int, n_ranks: int, n_microbatches: int) -> Lists:
    """All forwards, then all backwards: simplest, but every rank holds all microbatches' activations."""
    check_sizes("GPipe", n_stages, n_ranks, n_microbatches, 1)
    mbs = range(n_microbatches)
    return {r: [F(r, m) for m in mbs] + [B(r, m) for m in mbs] for r in range(n_ranks)}


def one_f_one_b(n_stages: int, n_ranks: int, n_microbatches: int) -> Lists:
    """Warm-up of p-r-1 forwards, then one forward and one backward in turn, then the remaining backwards."""
    check_sizes("1F1B", n_stages, n_ranks, n_microbatches, 1)
    out: Lists = {}
    for r in range(n_ranks):
        warmup = min(n_ranks - r - 1, n_microbatches)
        acts = [F(r, m) for m in range(warmup)]
        for k in range(n_microbatches - warmup):
            acts += [F(r, warmup + k), B(r, k)]
        acts += [B(r, m) for m in range(n_microbatches - warmup, n_microbatches)]
        out[r] = acts
    return out


def _interleaved_order(n_ranks: int, v: int, n_microbatches: int, reverse: bool) -> list[tuple[int, int]]:
    """Megatron's (chunk, microbatch) order: rounds of p microbatches, each round through every local
    chunk (in reverse chunk order for backwards)."""
    order = []
    for first in range(0, n_microbatches, n_ranks):
        for c in (reversed(range(v)) if reverse else range(v)):
            order += [(c, m) for m in range(first, first + n_ranks)]
    return order


def interleaved_1f1b(n_stages: int, n_ranks: int, n_microbatches: int) -> Lists:
    """Megatron interleaving: v stages per rank (loop placement), a warm-up of 2(p-r-1) + (v-1)p forwards,
    then 1F1B over (chunk, microbatch) pairs.

    Any microbatch count works: the order is made for the next multiple of p and the microbatches that
    do not exist are dropped. (A shorter last round would instead need the last rank's forwards sooner
    than its 1F1B order makes them, and the lists would block.)
    """
    v = check_sizes("Interleaved1F1B", n_stages, n_ranks, n_microbatches, None)
    padded = -(-n_microbatches // n_ranks) * n_ranks
    fwd = _interleaved_order(n_ranks, v, padded, reverse=False)
    bwd = _interleaved_order(n_ranks, v, padded, reverse=True)
    total = len(fwd)
    out: Lists = {}
    for r in range(n_ranks):
        warmup = min(total, 2 * (n_ranks - r - 1) + (v - 1) * n_ranks)
        order = [(F, fwd[k]) for k in range(warmup)]
        for k in range(total - warmup):
            order += [(F, fwd[warmup + k]), (B, bwd[k])]
        order += [(B, bwd[k]) for k in range(total - warmup, total)]
        out[r] = [make(c * n_ranks + r, m) for make, (c, m) in order if m < n_microbatches]
    return out


def looped_bfs(n_stages: int, n_ranks: int, n_microbatches: int) -> Lists:
    """Breadth first: each local stage (in model order) forwards every microbatch, then the backwards run
    through the local stages in reverse order. Loop placement, any multiple of p stages."""
    v = check_sizes("LoopedBFS", n_stages, n_ranks, n_microbatches, None)
    mbs = range(n_microbatches)
    out: Lists = {}
    for r in range(n_ranks):
        stages = [c * n_ranks + r for c in range(v)]
        out[r] = [F(s, m) for s in stages for m in mbs] + [B(s, m) for s in reversed(stages) for m in mbs]
    return out


class _DualPipeVRank:
    """One rank of DualPipeV: phase 0 is stage r (going down the ranks), phase 1 is stage 2p-1-r (coming back).

    The phases of the schedule are methods, as in deepseek-ai/DualPipe; counters skip microbatches past the
    end, so fewer than 2p microbatches still give a complete, runnable order.
    """

    def __init__(self, rank: int, n_ranks: int, n_microbatches: int) -> None:
        self.stage = (rank, 2 * n_ranks - 1 - rank)
        self.n = n_microbatches
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.weights: deque[Action] = deque()
        self.acts: list[Action] = []

    def forward(self, phase: int) -> None:
        if self.next_f[phase] < self.n:
            self.acts.append(F(self.stage[phase], self.next_f[phase]))
            self.next_f[phase] += 1

    def backward(self, phase: int, zero_bubble: bool = False) -> None:
        """Full B, or with `zero_bubble` only the input grads (I) now and the weight grads (W) queued."""
        if self.next_b[phase] < self.n:
            s, m = self.stage[phase], self.next_b[phase]
            self.acts.append(I(s, m) if zero_bubble else B(s, m))
            if zero_bubble:
                self.weights.append(W(s, m))
            self.next_b[phase] += 1

    def weight(self) -> None:
        if self.weights:
            self.acts.append(self.weights.popleft())

    def forward_backward(self, phase_f: int, phase_b: int) -> None:
        """The overlapped pair: a forward and a backward of different microbatches, back to back."""
        self.forward(phase_f)
        self.backward(phase_b)


def dualpipe_v(n_stages: int, n_ranks: int, n_microbatches: int) -> Lists:
    """DualPipeV ("cut-in-half" DualPipe, deepseek-ai/DualPipe): V placement, forward warm-up, overlapped
    forward/backward pairs in the steady phase, zero-bubble W's filling the cool-down."""
    check_sizes("DualPipeV", n_stages, n_ranks, n_microbatches, 2)
    p, n = n_ranks, n_microbatches
    out: Lists = {}
    for r in range(p):
        x = _DualPipeVRank(r, p, n)
        for _ in range((p - r - 1) * 2):  # 1: nF0
            x.forward(0)
        for _ in range(r + 1):  # 2: nF0F1
            x.forward(0)
            x.forward(1)
        for _ in range(p - r - 1):  # 3: nB1W1F1, zero bubble
            x.backward(1, zero_bubble=True)
            x.weight()
            x.forward(1)
        for _ in range(max(0, n - 2 * p + r + 1)):  # 4 (main): nF0B1F1B0
            x.forward_backward(0, 1)
            x.forward_backward(1, 0)
        for _ in range(p - r - 1):  # 5: nB1F1B0
            x.backward(1)
            x.forward_backward(1, 0)
        zero_bubble = False
        for i in range(r + 1):  # 6: nB1B0, the second half with zero bubble
            if i == (r + 1) // 2 and r % 2 == 1:
                zero_bubble = True
            x.backward(1, zero_bubble)
            if i == (r + 1) // 2 and r % 2 == 0:
                zero_bubble = True
            x.backward(0, zero_bubble)
        for _ in range(p - r - 1):  # 7: nWB0, zero bubble
            x.weight()
            x.backward(0, zero_bubble=True)
        while x.weights:  # 8: nW
            x.weight()
        out[r] = x.acts
    return out
