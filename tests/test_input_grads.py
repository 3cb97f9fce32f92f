"""Gradients that leave the pipeline through its inputs, and gradients of a loss with its own parameters
(found replaying users' loops), each against the unsplit model under every schedule:

- an input that carries the caller's own graph (`step(encoder(x))`) failed at the second microbatch
  ("backward through the graph a second time") and left the pipeline broken: the encoder now gets the
  gradient of the whole batch in one backward after the step;
- switching the input's `requires_grad` between steps (adversarial training alternating clean and
  input-gradient steps) changed what the first stage sends on (the input skips to a later stage) without
  new metadata: the step failed mid-way and every later one was refused;
- reading the first stage's inputs' `.grad` (views of the caller's tensor) raised torch's "not a leaf"
  warning from pp's own line;
- a `loss_fn` module with learnable parameters (a temperature, per-class weights) got no gradient under
  the zero-bubble schedules (W counted only the stage's parameters) and a partial one under DualPipeV;
  `pp.parallelize` at dp > 1, which would not average them, refuses it by name.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.schedules.registry import SCHEDULES, get_spec
from pp.testing import run_ranks
from pipes import placed, schedule_for

N_MB = 4
D = 8


class Net(nn.Module):
    """Stages of residual Linear layers; the input also skips to the last stage."""

    def __init__(self, n: int):
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(D, D) for _ in range(n))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = x
        for i, l in enumerate(self.ls):
            if i:
                pp.pipe_split()
            h = torch.tanh(l(h)) + h
        return self.head(h + 0.5 * x)


class LearnedLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_t = nn.Parameter(torch.tensor(0.3))
        self.w = nn.Parameter(torch.tensor([1.0, 0.5, 2.0]))

    def forward(self, out, y):
        return F.cross_entropy(out * self.log_t.exp() * self.w, y)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, D, generator=g), torch.randint(0, 3, (8,), generator=g)


def _reference(n_stages: int, input_grad: list[bool]) -> list[dict]:
    """Per step: the gradients of the model, the encoder, the loss and the input."""
    torch.manual_seed(0)
    enc, model, loss = nn.Linear(D, D), Net(n_stages), LearnedLoss()
    x, y = _data()
    out = []
    for rg in input_grad:
        for m in (enc, model, loss):
            m.zero_grad()
        leaf = x.clone().requires_grad_(rg)
        h = enc(leaf)
        for a, b in zip(h.chunk(N_MB), y.chunk(N_MB)):
            (loss(model(a), b) / N_MB).backward(retain_graph=True)
        out.append(_grads(model, enc, loss, leaf))
    return out


def _grads(model, enc, loss, leaf) -> dict:
    got = {f"model.{n}": p.grad for n, p in model.named_parameters()}
    got.update({f"enc.{n}": p.grad for n, p in enc.named_parameters()})
    got.update({f"loss.{n}": p.grad for n, p in loss.named_parameters()})
    got["x"] = leaf.grad
    return got


def _run(rank: int, world: int, names: list[str], input_grad: list[bool]) -> dict:
    warnings.simplefilter("error", UserWarning)   # pp's own lines raise no torch warning
    out = {}
    for name in names:
        n_stages, mine = placed(name, world, rank)
        torch.manual_seed(0)
        enc, model, loss = nn.Linear(D, D), Net(n_stages), LearnedLoss()
        x, y = _data()
        pipe = pp.pipeline(model, (x[:2],))
        stages = [pipe.build_stage(s, "cpu") for s in mine]
        sched = schedule_for(name, stages, N_MB, loss)
        steps = []
        for rg in input_grad:
            for m in (enc, model, loss):
                m.zero_grad()
            leaf = x.clone().requires_grad_(rg)
            sched.step(*((enc(leaf),) if 0 in mine else ()), target=y if n_stages - 1 in mine else None)
            got = _grads(model, enc, loss, leaf)
            keep = {f"model.{n}" for st in stages for n, _ in st.submod.named_parameters()}
            keep |= {k for k in got if k.startswith(("enc.", "x"))} if 0 in mine else set()
            keep |= {k for k in got if k.startswith("loss.")} if n_stages - 1 in mine else set()
            steps.append({k: v for k, v in got.items() if k in keep})
        out[name] = steps
    return out


@pytest.mark.parametrize("names", [["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS"],
                                   ["InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV", "ZBVHalf", "ZBVMin"]],
                         ids=["plain", "zero-bubble"])
def test_encoder_input_and_loss_gradients_match_the_unsplit_model(names):
    input_grad = [False, True, False]   # requires_grad switched between steps
    got = run_ranks(_run, 2, names, input_grad, timeout_s=300)
    for name in names:
        want = _reference(2 * (get_spec(name).stages_per_rank or 2), input_grad)
        for step, want_step in enumerate(want):
            have = {}
            for part in got:
                have.update(part[name][step])
            assert have.keys() == want_step.keys(), (name, step)
            for key, w in want_step.items():
                if w is None:
                    assert have[key] is None, f"{name} step {step} {key}: expected no gradient"
                else:
                    torch.testing.assert_close(have[key], w, msg=lambda m: f"{name} step {step} {key}: {m}")
    assert set(names) <= set(SCHEDULES)


def _parallelize_with_loss_params(rank: int, world: int) -> str:
    torch.manual_seed(0)
    x, _ = _data()
    try:
        pp.parallelize(copy.deepcopy(Net(2)), (x[:2],), n_microbatches=2, loss_fn=LearnedLoss(), pp=1, dp=2)
    except ValueError as e:
        return str(e)
    return "accepted"


def test_parallelize_refuses_a_loss_with_parameters_at_dp_above_1():
    for msg in run_ranks(_parallelize_with_loss_params, 2, timeout_s=120):
        assert msg.startswith("loss_fn (LearnedLoss) has trainable parameters (log_t, w) and dp=2"), msg
