"""Three ranks whose transfers go round a ring (rank 0 -> 1 -> 2 -> 0 within one step): in the step that
exchanges metadata each rank waited, blocking, for one peer's metadata before sending the data another
peer needed first, and the step hung (found with pp's loop schedules at fewer microbatches than ranks,
torch's CSV files at 4 ranks, and a GPipe order placed [0, 2, 1, 0]). A group's sends to peers it receives
nothing from now go out first, their metadata without waiting. Gradients against the unsplit model.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.testing import run_ranks

D = 8


def _model(n: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(n)])


def _batch(rows: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(rows, D, generator=g), torch.randn(rows, D, generator=g)


def _reference(n: int, n_mb: int) -> dict:
    model = _model(n)
    x, y = _batch(2 * n_mb)
    for a, b in zip(x.chunk(n_mb), y.chunk(n_mb)):
        (F.mse_loss(model(a), b) / n_mb).backward()
    return {f"{s}.{k}": p.grad for s, m in enumerate(model) for k, p in m.named_parameters()}


def _run(rank: int, world: int) -> dict:
    out = {}
    cases = [(name, n_mb) for name in ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble") for n_mb in (1, 2)]
    for name, n_mb in cases:   # stage s on rank s % 3
        model = _model(6)
        mine = [rank, rank + 3]
        stages = [pp.PipelineStage(copy.deepcopy(model[s]), s, 6, "cpu") for s in mine]
        sched = getattr(pp, f"Schedule{name}")(stages, n_mb, loss_fn=F.mse_loss)
        x, y = _batch(2 * n_mb)
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == 2 else None)
        out[(name, n_mb)] = {f"{s}.{k}": p.grad for s, st in zip(mine, stages) for k, p in st.submod.named_parameters()}
    # GPipe's order on 4 stages placed [0, 2, 1, 0]: 0 -> 2 -> 1 -> 0
    model = _model(4)
    mine = [s for s, r in enumerate([0, 2, 1, 0]) if r == rank]
    stages = [pp.PipelineStage(copy.deepcopy(model[s]), s, 4, "cpu") for s in mine]
    orders = {r: [f"{s}F{m}" for s in [s for s, q in enumerate([0, 2, 1, 0]) if q == r] for m in (0, 1)]
              + [f"{s}B{m}" for s in reversed([s for s, q in enumerate([0, 2, 1, 0]) if q == r]) for m in (0, 1)]
              for r in range(3)}
    sched = pp.schedule_from_actions(stages if len(stages) > 1 else stages[0], 2, orders, loss_fn=F.mse_loss)
    x, y = _batch(4)
    sched.step(*((x,) if 0 in mine else ()), target=y if 3 in mine else None)
    out[("ring order", 2)] = {f"{s}.{k}": p.grad for s, st in zip(mine, stages) for k, p in st.submod.named_parameters()}
    return out


def test_transfers_in_a_ring_of_three_ranks_do_not_hang_and_match_the_unsplit_model():
    got = run_ranks(_run, 3, timeout_s=180)
    for case in got[0]:
        want = _reference(4 if case[0] == "ring order" else 6, case[1])
        have = {}
        for part in got:
            have.update(part[case])
        assert have.keys() == want.keys(), case
        for key, w in want.items():
            torch.testing.assert_close(have[key], w, msg=lambda m: f"{case} {key}: {m}")
