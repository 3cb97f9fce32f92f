"""Small models and a reference check shared by the multi-rank runtime tests (module-level: picklable)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.schedules.classes import schedule_class
from pp.schedules.registry import get_spec


class DeepMLP(nn.Module):
    """An input layer, `n_layers` residual blocks, a head: cut anywhere between blocks."""

    def __init__(self, d: int = 12, n_layers: int = 8):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(n_layers))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


class SkipShared(nn.Module):
    """Four stages: stage 2 reads stage 0's output past stage 1 (a skip connection), and one parameter
    is used by stages 0 and 1."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.a = nn.Linear(4, d)
        self.b = nn.Linear(d, d)
        self.c = nn.Linear(d, d)
        self.d = nn.Linear(d, 2)
        self.shared = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        h0 = torch.tanh(self.a(x)) * self.shared
        pp.pipe_split()
        h1 = torch.tanh(self.b(h0)) * self.shared
        pp.pipe_split()
        h2 = torch.tanh(self.c(h1) + h0)
        pp.pipe_split()
        return self.d(h2)


def manual_stage_module(model: DeepMLP, stage: int, n_stages: int) -> nn.Module:
    """Cut DeepMLP by hand into `n_stages` consecutive pieces (the manual PipelineStage path)."""
    per = len(model.layers) // n_stages
    blocks = list(model.layers[stage * per:(stage + 1) * per])

    class Piece(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = model.inp if stage == 0 else None
            self.blocks = nn.ModuleList(blocks)
            self.head = model.head if stage == n_stages - 1 else None

        def forward(self, h):
            if self.inp is not None:
                h = self.inp(h)
            for b in self.blocks:
                h = h + b(h)
            return self.head(h) if self.head is not None else h

    return Piece()


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_mb: int):
    """Losses per microbatch and gradients of the batch's mean loss, on the unsplit model: the mean of
    the microbatches' losses, each weighted by its share of the rows where the split is uneven."""
    ref = copy.deepcopy(model)
    chunks = list(zip(x.tensor_split(n_mb), y.tensor_split(n_mb)))
    losses = [F.mse_loss(ref(xc), yc) for xc, yc in chunks]
    if len({xc.shape[0] for xc, _ in chunks}) == 1:
        (sum(losses) / n_mb).backward()
    else:
        sum(loss * (xc.shape[0] / x.shape[0]) for loss, (xc, _) in zip(losses, chunks)).backward()
    return torch.stack(losses).detach(), {n: p.grad for n, p in ref.named_parameters()}


def build_stages(model: nn.Module, name: str, world: int, rank: int, mb_example, traced: bool = True,
                 device: str = "cpu"):
    spec = get_spec(name)
    n_stages = world * (spec.stages_per_rank or 2)
    placement = spec.placement(n_stages, world)
    mine = [s for s in range(n_stages) if placement[s] == rank]
    if traced:
        pipe = pp.pipeline(model, (mb_example,), split_policy=pp.split_into_equal_size(n_stages))
        stages = [pipe.build_stage(s, device) for s in mine]
    else:
        stages = [pp.PipelineStage(manual_stage_module(model, s, n_stages), s, n_stages, device) for s in mine]
    return stages, n_stages


def run_schedule_against_reference(rank: int, world: int, name: str, n_mb: int, traced: bool,
                                   steps: int = 2, device: str = "cpu", cuda_graphs: bool = False) -> str:
    """Train `steps` steps with the schedule; the last step's losses and grads must equal the reference.

    cuda_graphs: replay the stages as CUDA graphs (captured after step 1; the last step must replay)."""
    torch.manual_seed(0)
    model = DeepMLP(n_layers=8 if world * 2 <= 8 else 16).to(device)
    batch = max(8, n_mb)
    x, y = torch.randn(batch, 4, device=device), torch.randn(batch, 3, device=device)
    want_losses, want_grads = reference(model, x, y, n_mb)
    stages, n_stages = build_stages(model, name, world, rank, x[: batch // n_mb], traced, device)
    arg = stages[0] if get_spec(name).stages_per_rank == 1 else stages
    sched = schedule_class(name)(arg, n_mb, loss_fn=F.mse_loss)
    if cuda_graphs:
        sched.enable_cuda_graphs()
    held = {s.stage_index for s in stages}
    for _ in range(steps):
        for s in stages:
            s.submod.zero_grad()
        losses: list = []
        sched.step(*((x,) if 0 in held else ()), target=y if n_stages - 1 in held else None, losses=losses)
    for s in stages:
        for n, p in s.submod.named_parameters():
            key = n if traced else _manual_name(n, s.stage_index, len(model.layers) // n_stages)
            torch.testing.assert_close(p.grad, want_grads[key], msg=lambda m: f"{name} {n}: {m}")
        if cuda_graphs and s.graphs.replays != (steps - 1) * n_mb:  # step 1 eager, every later one replayed
            raise AssertionError(f"{name}: stage {s.stage_index} replayed {s.graphs.replays} microbatches "
                                 f"as CUDA graphs, expected {(steps - 1) * n_mb}")
    if n_stages - 1 in held:
        torch.testing.assert_close(torch.stack(losses), want_losses)
    return name


def _manual_name(n: str, stage: int, per: int) -> str:
    """The unsplit model's name of a manual piece's parameter (`per` layers per stage)."""
    if n.startswith("blocks."):
        _, i, rest = n.split(".", 2)
        return f"layers.{stage * per + int(i)}.{rest}"
    return n
