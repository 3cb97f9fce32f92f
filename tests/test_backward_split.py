"""The I/W split of backward (pp/stage/backward.py) gives exactly the gradients of one plain backward."""
from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pp.stage import backward


class Mixed(nn.Module):
    """Every kind of split node: linear with and without bias on 3-d inputs (mm) and 2-d inputs (addmm),
    layer norms with and without affine weights, x @ W with W not transposed, a weight used twice, and a
    weight only an input-independent output reaches."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.ln_plain = nn.LayerNorm(8, elementwise_affine=False)
        self.ln_nobias = nn.LayerNorm(8, bias=False)
        self.a = nn.Linear(8, 16, bias=False)
        self.b = nn.Linear(16, 8)
        self.w = nn.Parameter(torch.randn(8, 8) / 3)
        self.shared = nn.Linear(8, 8, bias=False)
        self.const = nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = self.a(self.ln(x))                          # (2, 3, 16): mm via 3-d linear
        h = self.b(F.gelu(h).reshape(-1, 16)).view(2, 3, 8)  # addmm
        h = self.ln_nobias(self.ln_plain(h)) @ self.w   # x @ W
        h = self.shared(self.shared(h)) + x             # one weight twice
        return h, self.const * 2.0                      # second output: no input reaches it


def _grads(model, x, g, split: bool, direct: bool = True, hook: bool = False, edges: bool = True):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out, const = model(x)
    roots, seeds = [out, const], [g, torch.ones_like(const)]
    handle = model.a.weight.register_hook(lambda t: t * 2) if hook else None
    try:
        if split:
            backward.DIRECT, backward.CAPTURE_EDGES = direct, edges
            got, pending = backward.input_grads(roots, seeds, [x])
            backward.weight_grads(pending)
            gx = got[0]
        else:
            backward.run_backward(roots, seeds, accumulate=True, keep_graph=False)
            gx = x.grad
    finally:
        backward.DIRECT = backward.CAPTURE_EDGES = True
        if handle is not None:
            handle.remove()
    return gx, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("edges", [True, False])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("hook", [False, True])
def test_input_then_weight_grads_equal_one_backward(direct, hook, edges):
    torch.manual_seed(0)
    model = Mixed()
    x, g = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    want_x, want = _grads(model, x, g, split=False, hook=hook)
    for _ in range(2):  # the second time .grad already holds a value: accumulation
        got_x, got = _grads(model, x, g, split=True, direct=direct, hook=hook, edges=edges)
        torch.testing.assert_close(got_x, want_x)
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)


def test_weight_grads_accumulate_into_existing_grads():
    torch.manual_seed(0)
    model = Mixed()
    x, g = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    _, once = _grads(model, x, g, split=False)
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    for _ in range(2):
        out, const = model(x)
        _, pending = backward.input_grads([out, const], [g, torch.ones_like(const)], [x])
        backward.weight_grads(pending)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[name], msg=name)


def test_first_stage_defers_the_whole_backward_to_w():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 4))
    tokens, g = torch.randint(10, (2, 3)), torch.randn(2, 3, 4)
    out = model(tokens)
    got, pending = backward.input_grads([out], [g], [])
    assert got == [] and all(p.grad is None for p in model.parameters())
    backward.weight_grads(pending)
    have = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(tokens).backward(g)
    for name, p in model.named_parameters():
        torch.testing.assert_close(have[name], p.grad, msg=name)


class Block(nn.Module):
    """A pre-norm transformer MLP block: every split node is a bias-free linear or a layer norm."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.up = nn.Linear(8, 32, bias=False)
        self.down = nn.Linear(32, 8, bias=False)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.ln(x))))


def test_input_grads_free_what_only_the_input_side_needed():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    x, g = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    xr = x.clone().requires_grad_(True)
    model(xr).backward(g)
    want_x, want = xr.grad, {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    up_out = []  # weak: only the graph holds the up-projection's output (GELU saves it for the input side)
    handle = model[0].up.register_forward_hook(lambda m, i, o: up_out.append(weakref.ref(o)))
    xs = x.clone().requires_grad_(True)
    out = model(xs)
    handle.remove()
    got, pending = backward.input_grads([out], [g], [xs])
    del out
    assert pending.groups and all(kind == "plan" and node is None for kind, node, *_ in pending.groups)
    assert not pending.keeps_graph
    assert up_out[0]() is None, "I kept the graph although W needs none of it"
    backward.weight_grads(pending)
    torch.testing.assert_close(got[0], want_x)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], msg=name)
