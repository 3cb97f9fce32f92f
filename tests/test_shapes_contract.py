"""The input contract of traced stages: other batch sizes and sequence lengths than the example traced,
eval and step in any order, autocast. Every value is checked against the unsplit model (2 gloo ranks)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.schedules.classes import schedule_class
from pp.schedules.registry import SCHEDULES, get_spec
from pp.testing import RankError, run_ranks

ALL = list(SCHEDULES)


class ViewAttention(nn.Module):
    """Self-attention whose head split reads b and t off the input: `q.view(b, t, heads, d // heads)`."""

    def __init__(self, d: int = 16, heads: int = 4, residual: bool = True):
        super().__init__()
        self.heads, self.residual = heads, residual
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = k.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = v.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        out = self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + out if self.residual else out


class ViewModel(nn.Module):
    """Input layer, four ViewAttention blocks (cut between them; the first without a residual, so that
    nothing in it needs its output to have its input's shape), a head."""

    def __init__(self, d: int = 16, n_blocks: int = 4):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(ViewAttention(d, residual=i > 0) for i in range(n_blocks))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def flat_mse(out, y):
    """A language-model-style loss: outputs and targets flattened, so it runs on any pair of shapes of
    equal size (which is how a shape baked into a traced graph could go unnoticed)."""
    return F.mse_loss(out.reshape(-1), y.reshape(-1))


def reference(model, x, y, n_mb, autocast=False):
    ref = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = [flat_mse(ref(xc), yc) for xc, yc in zip(x.tensor_split(n_mb), y.tensor_split(n_mb))]
    (sum(losses) / n_mb).backward()
    return torch.stack(losses).detach(), {n: p.grad for n, p in ref.named_parameters()}


def _pipes(model, example) -> dict:
    """The model cut into 2 and into 4 stages (one trace each, shared by every schedule)."""
    pipes = {}
    for n_stages in (2, 4):
        cuts = {f"blocks.{i}": pp.SplitPoint.BEGINNING for i in range(4 // n_stages, 4, 4 // n_stages)}
        pipes[n_stages] = pp.pipeline(model, (example,), split_spec=cuts)
        assert pipes[n_stages].num_stages == n_stages
    return pipes


def _stages(pipes, name, world, rank, n_mb=3):
    spec = get_spec(name)
    n_stages = world * (spec.stages_per_rank or 2)
    placement = spec.placement(n_stages, world)
    stages = [pipes[n_stages].build_stage(s, "cpu") for s in range(n_stages) if placement[s] == rank]
    sched = schedule_class(name)(stages[0] if spec.stages_per_rank == 1 else stages, n_mb, loss_fn=flat_mse)
    return stages, sched, n_stages


def _step_and_compare(rank, model, stages, sched, n_stages, x, y, autocast=False, tol=None):
    held = {s.stage_index for s in stages}
    want_losses, want_grads = reference(model, x, y, 3, autocast)
    for s in stages:
        s.submod.zero_grad()
    losses: list = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        sched.step(*((x,) if 0 in held else ()), target=y if n_stages - 1 in held else None, losses=losses)
    kw = {} if tol is None else {"atol": tol, "rtol": tol}
    for s in stages:
        for n, p in s.submod.named_parameters():
            torch.testing.assert_close(p.grad, want_grads[n], msg=lambda m: f"{tuple(x.shape)} {n}: {m}", **kw)
    if n_stages - 1 in held:
        torch.testing.assert_close(torch.stack(losses), want_losses, **kw)


# (batch, sequence length) of each step; traced with one microbatch of 3 rows of length 6
SHAPES = [(8, 6), (8, 9), (8, 4), (6, 9), (8, 6)]


def _other_shapes(rank, world):
    torch.manual_seed(0)
    model = ViewModel()
    pipes = _pipes(model, torch.randn(3, 6, 8))
    for name in ALL:
        stages, sched, n_stages = _stages(pipes, name, world, rank)
        for b, t in SHAPES:
            gen = torch.Generator().manual_seed(b * 100 + t)
            x, y = torch.randn(b, t, 8, generator=gen), torch.randn(b, t, 3, generator=gen)
            try:
                _step_and_compare(rank, model, stages, sched, n_stages, x, y)
            except Exception as e:
                raise AssertionError(f"{name} at batch {b}, length {t}: {e}") from e
    return ALL


def test_traced_stages_take_other_batch_sizes_and_lengths_on_every_schedule():
    """Traced on a 3 x 6 microbatch, then batches of 8 (chunks 3, 3, 2) at lengths 6, 9, 4, and 6 x 9
    (chunks of 2 x 9 = 18 = 3 x 6 rows: a view frozen to the example's sizes would fit, silently wrong)."""
    assert run_ranks(_other_shapes, 2, timeout_s=300)[0] == ALL
