"""Stage outputs that are dense but not contiguous (a transpose at every cut, a channels_last CNN) cross
the cut and get their gradients back in the right order: losses and gradients equal the unsplit model's.
Found in the field: the gradient's receive buffer kept the output's strides, so gloo refused it and NCCL
would have filled it in the wrong order (silently permuted gradients)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.schedules.registry import get_spec
from pp.schedules.classes import schedule_class
from pp.testing import run_ranks


class Block(nn.Module):
    """(B, 8, T) -> (B, 8, T): its output is the transpose of a contiguous (B, T, 8) tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, h):
        return torch.tanh(self.lin(h.transpose(1, 2))).transpose(1, 2)


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = x.transpose(1, 2)
        for layer in self.layers:
            h = layer(h)
        return self.head(h.transpose(1, 2))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        pp.pipe_split()
        return self.fc(torch.relu(self.c2(h)).mean((2, 3)))


def _unsplit(model, x, y, n_mb):
    ref = copy.deepcopy(model)
    losses = [F.mse_loss(ref(a), b) for a, b in zip(x.chunk(n_mb), y.chunk(n_mb))]
    (sum(losses) / n_mb).backward()
    return torch.stack(losses).detach(), {n: p.grad for n, p in ref.named_parameters()}


def _run(rank: int, world: int, kind: str, name: str) -> bool:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "cnn":
        model = CNN().to(memory_format=torch.channels_last)
        x = torch.randn(8, 3, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)
        pipe = pp.pipeline(model, (x[:2],))
    else:
        model = Transposed()
        x = torch.randn(8, 5, 8, generator=gen)
        n_stages = world * (get_spec(name).stages_per_rank or 2)
        cuts = {f"layers.{i}": pp.SplitPoint.BEGINNING for i in range(4 // n_stages, 4, 4 // n_stages)}
        pipe = pp.pipeline(model, (x[:2],), split_spec=cuts)
    y = torch.randn(8, 3, generator=gen) if kind == "cnn" else torch.randn(8, 5, 3, generator=gen)
    want_losses, want_grads = _unsplit(model, x, y, 4)
    spec = get_spec(name)
    placement = spec.placement(pipe.num_stages, world)
    stages = [pipe.build_stage(s, "cpu") for s in range(pipe.num_stages) if placement[s] == rank]
    sched = schedule_class(name)(stages[0] if spec.stages_per_rank == 1 else stages, 4, loss_fn=F.mse_loss)
    held = {s.stage_index for s in stages}
    losses: list = []
    sched.step(*((x,) if 0 in held else ()), target=y if pipe.num_stages - 1 in held else None, losses=losses)
    if pipe.num_stages - 1 in held:
        torch.testing.assert_close(torch.stack(losses), want_losses)
    for s in stages:
        for n, p in s.submod.named_parameters():
            torch.testing.assert_close(p.grad, want_grads[n], msg=lambda m: f"{kind} {name} {n}: {m}")
    return True


@pytest.mark.parametrize("kind,name", [("transposed", "1F1B"), ("transposed", "ZBVZeroBubble"),
                                       ("transposed", "Interleaved1F1B"), ("cnn", "1F1B")])
def test_non_contiguous_stage_outputs_get_their_gradients_in_order(kind, name):
    assert run_ranks(_run, 2, kind, name) == [True, True]
