"""What a model computes under `torch.no_grad()` inside forward (found replaying users' models):

- a stop-gradient value (a normaliser computed under no_grad) was a constant in eager but not in pp's
  traced stages: torch.export keeps the block as one node, its decomposition inlined the ops as ordinary
  ones, and gradients flowed through it (stage 0's weight gradient 11 % off, no error);
- a buffer updated under no_grad from activations (a running mean, spectral_norm's power iteration)
  kept autograd history in the stage (the write-back was not detached), so the next microbatch's
  backward ran into the previous one's graph ("backward through the graph a second time") or, where it
  could, added wrong gradients.

Each is compared with the unsplit model (gradient accumulation over the same microbatches) under every
schedule, over two steps.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations

import pp
from pp.schedules.registry import SCHEDULES, get_spec
from pp.testing import run_ranks
from pipes import placed, schedule_for

N_MB = 4
D = 8


class Block(nn.Module):
    """A stop-gradient normaliser, a running mean updated under no_grad, and a spectral-norm Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = parametrizations.spectral_norm(nn.Linear(D, D))
        self.register_buffer("running", torch.zeros(D))

    def forward(self, h):
        h = torch.tanh(self.a(h))
        with torch.no_grad():
            scale = h.abs().mean(-1, keepdim=True) + 1.0
            if self.training:
                self.running.mul_(0.9).add_(0.1 * h.mean(0))
        return self.b(h) / scale - self.running


class Net(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            if i:
                pp.pipe_split()
            x = b(x)
        return x


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, D, generator=g), torch.randn(8, D, generator=g)) for _ in range(2)]


def _reference(n_stages: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = Net(n_stages)
    for x, y in _batches():
        model.zero_grad()
        for a, b in zip(x.chunk(N_MB), y.chunk(N_MB)):
            (F.mse_loss(model(a), b) / N_MB).backward()
    return ({n: p.grad for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


def _run(rank: int, world: int, names: list[str]) -> dict:
    out = {}
    for name in names:
        n_stages, mine = placed(name, world, rank)
        torch.manual_seed(0)
        model = Net(n_stages)
        pipe = pp.pipeline(model, (torch.randn(2, D),))
        stages = [pipe.build_stage(s, "cpu") for s in mine]
        sched = schedule_for(name, stages, N_MB, F.mse_loss)
        for x, y in _batches():
            for st in stages:
                st.submod.zero_grad()
            sched.step(*((x,) if 0 in mine else ()), target=y if n_stages - 1 in mine else None)
        out[name] = ({n: p.grad for st in stages for n, p in st.submod.named_parameters()},
                     {n: b.clone() for st in stages for n, b in st.submod.named_buffers()},
                     [b.requires_grad for st in stages for b in st.submod.buffers()])
    return out


@pytest.mark.parametrize("names", [["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS"],
                                   ["InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV", "ZBVHalf", "ZBVMin"]],
                         ids=["plain", "zero-bubble"])
def test_no_grad_values_and_buffer_updates_match_the_unsplit_model(names):
    got = run_ranks(_run, 2, names, timeout_s=240)
    for name in names:
        want_grads, want_buffers = _reference(2 * (get_spec(name).stages_per_rank or 2))
        grads, buffers, flags = {}, {}, []
        for part in got:
            grads.update(part[name][0])
            buffers.update(part[name][1])
            flags += part[name][2]
        assert grads.keys() == want_grads.keys()
        for key, want in want_grads.items():
            torch.testing.assert_close(grads[key], want, msg=lambda m: f"{name} {key}: {m}")
        for key, want in want_buffers.items():
            torch.testing.assert_close(buffers[key], want, msg=lambda m: f"{name} buffer {key}: {m}")
        assert not any(flags), f"{name}: a buffer updated under no_grad requires grad"
    assert set(names) <= set(SCHEDULES)


def test_a_pipe_called_directly_treats_no_grad_values_as_constants():
    torch.manual_seed(0)
    model = Net(2)
    ref = copy.deepcopy(model)
    x, y = _batches()[0]
    pipe = pp.pipeline(model, (x[:2],))
    F.mse_loss(pipe(x)[0], y).backward()
    F.mse_loss(ref(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{n}: {m}")
