"""Backward code a model brings itself (a straight-through estimator or gradient reversal as an autograd
Function, a gradient hook on an activation, a module backward hook, a Megatron-style Function that adds
its weight gradient into `param.main_grad`), found by replaying other pipeline libraries' bug reports
(torch#166577, torch#144530, torch#174017, Megatron-DeepSpeed#442): manual stages train as the unsplit
model under every schedule, the zero-bubble I/W split included; a traced model, whose backward torch.export
would drop, is refused naming what and where. Right values from the unsplit model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.schedules.classes import schedule_class
from pp.schedules.registry import SCHEDULES, get_spec
from pp.testing import run_ranks

D, N_MB = 8, 4


class STE(torch.autograd.Function):
    """Straight-through rounding (quantisation-aware training, VQ-VAE): backward passes g through."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class LinearMainGrad(torch.autograd.Function):
    """x @ w.T whose backward adds w's gradient into `w.main_grad` and returns None for w (Megatron's
    gradient-accumulation fusion)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w.t()

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        w.main_grad.add_(g.flatten(0, -2).t() @ x.flatten(0, -2))
        return g @ w, None


class Block(nn.Module):
    """A linear layer, then the block's own backward code (`kind`), then another linear layer."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.l, self.m = nn.Linear(D, D), nn.Linear(D, D)
        self.w = nn.Parameter(torch.randn(D, D) * 0.3)
        self.w.main_grad = torch.zeros(D, D)
        if kind == "module hook":
            self.l.register_full_backward_hook(lambda mod, gi, go: tuple(None if g is None else -g for g in gi))

    def forward(self, x):
        h = self.l(x)
        if self.kind == "ste":
            h = STE.apply(h)
        elif self.kind == "tensor hook" and h.requires_grad:
            h.register_hook(lambda g: -0.5 * g)   # gradient reversal, scaled
        elif self.kind == "main_grad":
            h = LinearMainGrad.apply(h, self.w)
        return torch.tanh(self.m(h))


def _blocks(kind: str, n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [Block(kind) for _ in range(n - 1)] + [nn.Linear(D, 3)]


def _grads(mod: nn.Module) -> dict:
    out = {k: p.grad for k, p in mod.named_parameters() if p.grad is not None}
    if isinstance(mod, Block) and mod.kind == "main_grad":
        out["w.main_grad"] = mod.w.main_grad
    return out


def _manual(rank: int, world: int, kind: str, names: list[str]) -> list[str]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, D, generator=g), torch.randn(8, 3, generator=g)
    for name in names:
        spec = get_spec(name)
        n = spec.n_stages(world)
        ref = _blocks(kind, n)
        for xc, yc in zip(x.tensor_split(N_MB), y.tensor_split(N_MB)):
            h = xc
            for m in ref:
                h = m(h)
            (F.mse_loss(h, yc) / N_MB).backward()
        mods = _blocks(kind, n)
        placement = spec.placement(n, world)
        mine = [s for s in range(n) if placement[s] == rank]
        stages = [pp.PipelineStage(mods[s], s, n, "cpu") for s in mine]
        sched = schedule_class(name)(stages[0] if spec.stages_per_rank == 1 else stages, N_MB, loss_fn=F.mse_loss)
        sched.step(*((x,) if 0 in mine else ()), target=y if n - 1 in mine else None)
        for s in mine:
            want = _grads(ref[s])
            got = _grads(mods[s])
            assert got.keys() == want.keys(), (name, s)
            for k, v in want.items():
                torch.testing.assert_close(got[k], v, msg=lambda m: f"{name} stage {s} {k}: {m}")
    return names


@pytest.mark.parametrize("kind", ["tensor hook", "main_grad", "ste", "module hook"])
def test_manual_stages_with_their_own_backward_train_as_the_unsplit_model_under_every_schedule(kind):
    """The zero-bubble split ran a hooked node's weight side by hand from the gradient captured before the
    hook (stages after the first: as if the hook had not run), and ran a Python Function's backward in I
    and again in W (main_grad doubled)."""
    names = list(SCHEDULES)
    assert run_ranks(_manual, 2, kind, names, timeout_s=600)[0] == names


def _global_hook(mod, gi, go):
    return None


@pytest.mark.parametrize("kind", ["ste", "tensor hook", "module hook", "global module hook"])
def test_a_traced_model_whose_backward_torch_export_would_drop_is_refused(kind):
    model = nn.Sequential(*_blocks("plain" if kind == "global module hook" else kind, 3))
    handle = None
    if kind == "global module hook":
        handle = torch.nn.modules.module.register_module_full_backward_hook(_global_hook)
    want = {"ste": r"autograd Function STE at test_custom_backward\.py:\d+",
            "tensor hook": r"a gradient hook \(Tensor\.register_hook\) at test_custom_backward\.py:\d+",
            "module hook": r"backward hooks on module '0\.l' \(Linear\) \(and 1 more: backward hooks on module '1\.l'",
            "global module hook": r"backward hooks on every module"}[kind]
    try:
        with pytest.raises(pp.PipelineTraceError, match=f"Sequential brings backward code of its own, which "
                           f"torch.export drops: {want}.*pp.PipelineStage"):
            pp.pipeline(model, (torch.randn(2, D),), split_spec={"1": pp.SplitPoint.BEGINNING})
    finally:
        if handle is not None:
            handle.remove()


class Checkpointed(nn.Module):
    """A block checkpointing itself with torch.utils.checkpoint."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.l, self.reentrant = nn.Linear(D, D), reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.l(t)), x, use_reentrant=self.reentrant)


def test_non_reentrant_checkpointing_traces_and_matches_the_unsplit_model():
    torch.manual_seed(0)
    model = nn.Sequential(Checkpointed(False), Checkpointed(False), nn.Linear(D, 3))
    x = torch.randn(2, D)
    pipe = pp.pipeline(model, (x,), split_spec={"1": pp.SplitPoint.BEGINNING})
    out = pipe(x)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, model(x))
    out.square().sum().backward()
    model(x).square().sum().backward()
    got = {k: v for s in range(2) for k, v in pipe.get_stage_module(s).named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name].grad, p.grad, msg=name)


def test_reentrant_checkpointing_in_a_traced_model_is_refused_naming_the_fix():
    """torch runs a reentrant region's forward without gradients and torch.export keeps it so: the layers
    in and before it got no gradient at all on a pipeline's ranks, silently (found by a fresh user)."""
    model = nn.Sequential(Checkpointed(True), Checkpointed(True), nn.Linear(D, 3))
    with pytest.raises(pp.PipelineTraceError, match=r"torch\.utils\.checkpoint\(use_reentrant=True\) at "
                       r"test_custom_backward\.py:\d+, whose region the trace runs without gradients \(use "
                       r"use_reentrant=False"):
        pp.pipeline(model, (torch.randn(2, D),), split_spec={"1": pp.SplitPoint.BEGINNING})
