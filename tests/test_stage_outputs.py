"""What manual stages hand each other, found by replaying users' models (CPU, gloo), each against the
unsplit model:

- outputs that nest (a dict, a tuple inside the tuple: a Llama-style `(h, (cos, sin))`) were pickled
  whole into the step's metadata, tensors included, so no gradient came back (stage 0's gradient was
  None) and the second step failed comparing tensors; between two stages on one rank (V schedules) the
  nested tensors were not detached, so the consumer's backward ran into the producer's graph (wrong
  gradients) or W failed. They now travel as leaves and the next stage gets the same structure back;
- a complex output that requires grad (an FFT at the cut) got no gradient back;
- one tensor sent twice (`(h, h)`, h straight out of a Linear) gave that Linear a wrong weight gradient
  under the zero-bubble schedules (the I/W split counted the repeated root once);
- a step under the caller's `torch.autocast` after one without it (same shapes) failed mid-way as an
  output "whose shape depends on the data" and left the pipeline unusable.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.testing import run_ranks

D = 8


class Inp(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, D)

    def forward(self, x):
        return torch.tanh(self.l(x))


class NestOut(nn.Module):
    """Returns `kind` of structure: a dict, a nested tuple, or a Llama-style (h, (cos, sin)) whose inner
    tensors need no gradient."""

    def __init__(self, kind):
        super().__init__()
        self.l, self.kind = nn.Linear(D, D), kind

    def forward(self, h):
        a = torch.tanh(self.l(h))
        if self.kind == "dict":
            return {"a": a, "b": (h, h * 2), "n": 3}
        if self.kind == "twice":   # one tensor, straight out of a Linear, sent twice
            a = self.l(h)
            return a, a
        if self.kind == "rotary":
            pos = torch.arange(D, dtype=h.dtype)
            return a, (pos.cos().expand_as(h), pos.sin().expand_as(h))
        return a, (h, h * 2)


class NestIn(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.l, self.kind = nn.Linear(D, D), kind

    def forward(self, *o):
        if self.kind == "dict":
            a, (b, c), n = o[0]["a"], o[0]["b"], o[0]["n"]
            return torch.tanh(self.l(a)) + b * c * n
        if self.kind == "twice":
            a, b = o
            return torch.tanh(self.l(a)) + 0.5 * b
        a, (b, c) = o
        return torch.tanh(self.l(a)) * b + c


class Spectral(nn.Module):
    """Ends in a complex tensor that requires grad."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(D, D)

    def forward(self, h):
        return torch.fft.fft(torch.tanh(self.l(h)), dim=-1)


class FromSpectral(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(D, D)

    def forward(self, z):
        return self.l(torch.fft.ifft(z * 0.5, dim=-1).real + z.abs())


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(D, 3)

    def forward(self, h):
        return self.l(h)


def _modules(kind: str) -> list[nn.Module]:
    torch.manual_seed(0)
    if kind == "complex":
        return [Inp(), Spectral(), FromSpectral(), Head()]
    return [Inp(), NestOut(kind), NestIn(kind), Head()]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)


def _chain(mods, x):
    out = mods[0](x)
    for m in mods[1:]:
        out = m(*out) if isinstance(out, tuple) else m(out)
    return out


def _reference(kind: str) -> dict:
    mods = _modules(kind)
    x, y = _batch()
    (sum(F.mse_loss(_chain(mods, a), b) for a, b in zip(x.chunk(4), y.chunk(4))) / 4).backward()
    return {(s, n): p.grad for s, m in enumerate(mods) for n, p in m.named_parameters()}


def _run(rank: int, world: int, kind: str, schedule: str) -> dict:
    """Two steps (the second reuses the first's metadata); returns each local parameter's gradient of
    the second step."""
    mods = _modules(kind)
    x, y = _batch()
    mine = [rank, 3 - rank] if schedule == "ScheduleZBVZeroBubble" else [2 * rank, 2 * rank + 1]
    if schedule == "ScheduleZBVZeroBubble":
        stages = [pp.PipelineStage(mods[s], s, 4, "cpu") for s in mine]
        sched = pp.ScheduleZBVZeroBubble(stages, 4, loss_fn=F.mse_loss)
        holds_first, holds_last = rank == 0, rank == 0
    else:   # two stages per rank as one module each side of the cut between ranks: 1 | 2
        local = [nn.Sequential(mods[0], mods[1]), _Tail(mods[2], mods[3])][rank]
        stages = [pp.PipelineStage(local, rank, 2, "cpu")]
        sched = getattr(pp, schedule)(stages[0], 4, loss_fn=F.mse_loss)
        holds_first, holds_last = rank == 0, rank == 1
    for _ in range(2):
        for m in mods:
            m.zero_grad()
        sched.step(*((x,) if holds_first else ()), target=y if holds_last else None)
    return {(s, n): p.grad.clone() for s in mine for n, p in mods[s].named_parameters()}


class _Tail(nn.Module):
    def __init__(self, first, head):
        super().__init__()
        self.first, self.head = first, head

    def forward(self, *o):
        return self.head(self.first(*o))


@pytest.mark.parametrize("kind", ["dict", "tuple", "rotary", "complex", "twice"])
@pytest.mark.parametrize("schedule", ["Schedule1F1B", "ScheduleZBVZeroBubble"])
def test_structured_and_complex_outputs_get_the_unsplit_models_gradients(kind, schedule):
    want = _reference(kind)
    got = {}
    for part in run_ranks(_run, 2, kind, schedule, timeout_s=120):
        got.update(part)
    assert got.keys() == want.keys()
    for key, g in want.items():
        torch.testing.assert_close(got[key], g, msg=f"{kind} {schedule} {key}")


def _autocast_between_steps(rank: int, world: int) -> list:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Linear(8, 3))
    x, y = _batch()
    stage = pp.PipelineStage(copy.deepcopy(model[:3] if rank == 0 else model[3:]), rank, 2, "cpu")
    sched = pp.Schedule1F1B(stage, 4, loss_fn=F.mse_loss)
    got = []
    for autocast in (False, True, False):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        losses: list = []
        with ctx:
            sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None, losses=losses)
        if rank == 1:
            with ctx:
                want = torch.stack([F.mse_loss(model(a), b) for a, b in zip(x.chunk(4), y.chunk(4))])
            got.append((torch.stack(losses).float(), want.float()))
    return got


def test_a_step_under_autocast_after_one_without_exchanges_metadata_afresh():
    for got, want in run_ranks(_autocast_between_steps, 2, timeout_s=120)[1]:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
