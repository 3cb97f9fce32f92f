"""Stage modules whose backward pp cannot split into input and weight halves, under the zero-bubble
schedules (I/W split), each against the unsplit model:

- a module that checkpoints itself with `torch.utils.checkpoint(..., use_reentrant=True)` (Hugging Face's
  old default): torch refuses to run such a region under an engine call for inputs, so every zero-bubble
  schedule failed in I ("use_reentrant=True ... incompatible with .grad()");
- a Python autograd Function whose weight side is reached twice: I runs the whole backward, and W then
  failed (KeyError) once the microbatch's input gradients had been handed over.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import pp
from pp.testing import run_ranks
from test_backward_multiuse import _Scale   # x * w as a Python autograd Function


class Reentrant(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(8, 8)

    def forward(self, h):
        return checkpoint(lambda t: torch.tanh(self.l(t)), h, use_reentrant=True)


class ScaledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, h):
        return torch.tanh(_Scale.apply(_Scale.apply(h, self.v), self.v))


def _modules(kind: str) -> list[nn.Module]:
    torch.manual_seed(0)
    middle = Reentrant if kind == "reentrant" else ScaledTwice
    return [nn.Linear(4, 8), middle(), middle(), nn.Linear(8, 3)]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)


SCHEDULES = {   # stages each rank holds
    "ScheduleZBVZeroBubble": ((0, 3), (1, 2)),
    "ScheduleDualPipeV": ((0, 3), (1, 2)),
    "ScheduleInterleavedZeroBubble": ((0, 2), (1, 3)),
    "ScheduleInterleaved1F1B": ((0, 2), (1, 3)),
}


def _run(rank: int, world: int, kind: str, schedule: str) -> dict:
    mods = _modules(kind)
    x, y = _batch()
    mine = SCHEDULES[schedule][rank]
    sched = getattr(pp, schedule)([pp.PipelineStage(mods[s], s, 4, "cpu") for s in mine], 4, loss_fn=F.mse_loss)
    first, last = 0 in mine, 3 in mine
    for _ in range(2):   # the second step reuses the first's metadata
        for m in mods:
            m.zero_grad()
        sched.step(*((x,) if first else ()), target=y if last else None)
    return {(s, n): p.grad.clone() for s in mine for n, p in mods[s].named_parameters()}


@pytest.mark.parametrize("kind", ["reentrant", "python function"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_unsplittable_backwards_get_the_unsplit_models_gradients(kind, schedule):
    mods = _modules(kind)
    ref = copy.deepcopy(mods)
    x, y = _batch()

    def chain(h):
        for m in ref:
            h = m(h)
        return h

    (sum(F.mse_loss(chain(a), b) for a, b in zip(x.chunk(4), y.chunk(4))) / 4).backward()
    want = {(s, n): p.grad for s, m in enumerate(ref) for n, p in m.named_parameters()}
    got = {}
    for part in run_ranks(_run, 2, kind, schedule, timeout_s=120):
        got.update(part)
    assert got.keys() == want.keys()
    for key, g in want.items():
        torch.testing.assert_close(got[key], g, msg=f"{kind} {schedule} {key}")
