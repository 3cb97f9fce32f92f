"""Dropout on different pipeline ranks draws different masks (pp.schedules.rng): ranks seeded alike
drew the very same mask in stage 1 as in stage 0, microbatch by microbatch (reported against other
pipeline libraries; the unsplit model's two dropouts differ). Runs repeat, and the caller's random
stream is left advanced by one draw."""
from __future__ import annotations

import torch
import torch.nn as nn

import pp
from pp.testing import run_ranks


class TwoDrops(nn.Module):
    def __init__(self):
        super().__init__()
        self.d0, self.d1 = nn.Dropout(0.5), nn.Dropout(0.5)
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        a = self.d0(x * self.w)
        pp.pipe_split()
        b = self.d1(torch.ones_like(a) * self.w)
        return torch.stack([a, b])   # both masks reach the last stage


def _masks(rank: int, world: int) -> dict | None:
    x = torch.ones(8, 64)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        stage = pp.pipeline(TwoDrops(), (x[:2],)).build_stage(rank, "cpu")
        sched = pp.ScheduleGPipe(stage, 4, loss_fn=lambda out, t: out.sum() * 0)
        out = sched.step(*((x,) if rank == 0 else ()), target=x if rank == 1 else None)
        after = torch.rand(3)
        runs.append((out, after))
    expected_after = torch.Generator().manual_seed(0)
    torch.randint(0, 2 ** 62, (1,), generator=expected_after)   # the one draw a step takes
    if rank == 0:
        return None
    (out, after), (again, after2) = runs
    return {"same_across_stages": bool((out[0] == out[1]).all()), "repeat": bool(torch.equal(out, again)),
            "stream": torch.equal(after, torch.rand(3, generator=expected_after)) and torch.equal(after, after2)}


def test_stages_on_different_ranks_draw_different_dropout_masks():
    got = run_ranks(_masks, 2)[1]
    assert got == {"same_across_stages": False, "repeat": True, "stream": True}, got
