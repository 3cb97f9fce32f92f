"""Parameters reached by several paths inside one stage, parameter hooks, and `dw_builder`, under every
schedule (the I/W-split ones above all): gradients equal the unsplit model's, hooks fire once per
microbatch, the user's weight-gradient runner runs once per microbatch."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.schedules.classes import schedule_class
from pp.schedules.registry import SCHEDULES, get_spec
from pp.stage import backward
from pp.testing import run_ranks

ALL = list(SCHEDULES)
N_MB = 4


class MultiUse(nn.Module):
    """One stage's block: a Linear applied twice, a LayerNorm applied twice, `h @ w @ w`, and a scale
    cast once and used twice."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)
        self.scale = nn.Parameter(torch.rand(d) + 0.5)
        with torch.no_grad():
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = torch.tanh(self.lin(self.lin(x)))
        h = self.ln(self.ln(h) * 2.0)
        s = self.scale * 1.0
        return x + (h * s) @ self.w @ self.w * s


class Net(nn.Module):
    def __init__(self, n_blocks: int, d: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList(MultiUse(d) for _ in range(n_blocks))

    def forward(self, x):
        for i, b in enumerate(self.blocks):
            if i:
                pp.pipe_split()
            x = b(x)
        return x


def _double(g: torch.Tensor) -> torch.Tensor:
    return g * 2


def _reference(model: nn.Module, x, y, double: bool):
    ref = copy.deepcopy(model)
    if double:
        for b in ref.blocks:
            b.ln.weight.register_hook(_double)
    losses = [F.mse_loss(ref(xc), yc) for xc, yc in zip(x.tensor_split(N_MB), y.tensor_split(N_MB))]
    (sum(losses) / N_MB).backward()
    return torch.stack(losses).detach(), {n: p.grad for n, p in ref.named_parameters()}


def _stages(name: str, world: int, rank: int, traced: bool, x, dw_builder=None):
    """This rank's stages of a fresh Net (seeded: every rank builds the same one) and the Net."""
    spec = get_spec(name)
    n_stages = spec.n_stages(world)
    placement = spec.placement(n_stages, world)
    mine = [s for s in range(n_stages) if placement[s] == rank]
    torch.manual_seed(0)
    model = Net(n_stages)
    if traced:
        pipe = pp.pipeline(model, (x[: len(x) // N_MB],))
        stages = [pipe.build_stage(s, "cpu") for s in mine]
        names = [{n: n for n, _ in st.submod.named_parameters()} for st in stages]
    else:
        stages = [pp.PipelineStage(model.blocks[s], s, n_stages, "cpu",
                                   dw_builder=None if dw_builder is None else dw_builder(s)) for s in mine]
        names = [{n: f"blocks.{s}.{n}" for n, _ in model.blocks[s].named_parameters()} for s in mine]
    return model, stages, names, n_stages


def _step(name: str, stages: list, n_stages: int, x, y, steps: int = 1, before_step=None):
    spec = get_spec(name)
    sched = schedule_class(name)(stages[0] if spec.stages_per_rank == 1 else stages, N_MB, loss_fn=F.mse_loss)
    held = {s.stage_index for s in stages}
    losses: list = []
    for _ in range(steps):
        for s in stages:
            s.submod.zero_grad()
        if before_step is not None:
            before_step()
        losses = []
        sched.step(*((x,) if 0 in held else ()), target=y if n_stages - 1 in held else None, losses=losses)
    return losses if n_stages - 1 in held else None


def _check(name, stages, names, losses, want_losses, want_grads):
    for st, names_of in zip(stages, names):
        for n, p in st.submod.named_parameters():
            torch.testing.assert_close(p.grad, want_grads[names_of[n]],
                                       msg=lambda m: f"{name} stage {st.stage_index} {n}: {m}")
    if losses is not None:
        torch.testing.assert_close(torch.stack(losses), want_losses)


# ------------------------------------------------------------------------------ several uses
def _multiuse(rank, world, traced):
    x, y = torch.randn(8, 3, 8), torch.randn(8, 3, 8)
    done = []
    for name in ("1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"):
        model, stages, names, n_stages = _stages(name, world, rank, traced, x)
        want_losses, want_grads = _reference(model, x, y, double=False)
        losses = _step(name, stages, n_stages, x, y)
        _check(name, stages, names, losses, want_losses, want_grads)
        done.append(name)
    return done


# traced stages: slow (CI's time budget); a traced stage's parameter used twice (the tied embedding and
# head of a 2-rank cut) is checked against the unsplit model by test_parallel and test_launcher_run
@pytest.mark.parametrize("traced", [pytest.param(True, marks=pytest.mark.slow), False], ids=["traced", "manual"])
def test_parameters_used_twice_in_a_stage_get_the_unsplit_gradients(traced):
    names = ["1F1B", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]
    assert run_ranks(_multiuse, 4, traced, timeout_s=300) == [names] * 4


# ------------------------------------------------------------------------------ hooks
def _hooks(rank, world, traced):
    """Every parameter carries an AccumulateGrad pre- and post-hook (DDP's way), a tensor hook and a
    post-accumulate-grad hook; the LayerNorm weights' tensor hook doubles the gradient (the reference
    model has the same). Each must fire once per microbatch, and the gradients stay exact."""
    x, y = torch.randn(8, 3, 8), torch.randn(8, 3, 8)
    for name in ALL:
        model, stages, names, n_stages = _stages(name, world, rank, traced, x)
        want_losses, want_grads = _reference(model, x, y, double=True)
        fired: Counter = Counter()
        keep = []
        for st in stages:
            for n, p in st.submod.named_parameters():
                acc = p.view_as(p).grad_fn.next_functions[0][0]
                keep.append(acc)   # the node lives as long as someone holds it: so do its hooks
                acc.register_prehook(lambda g, n=n, s=st.stage_index: fired.update([("pre", s, n)]))
                acc.register_hook(lambda gi, go, n=n, s=st.stage_index: fired.update([("post", s, n)]))
                p.register_post_accumulate_grad_hook(
                    lambda t, n=n, s=st.stage_index: fired.update([("accumulated", s, n)]))
                doubles = n.endswith("ln.weight")
                p.register_hook(lambda g, n=n, s=st.stage_index, d=doubles:
                                fired.update([("tensor", s, n)]) or (g * 2 if d else None))
        losses = _step(name, stages, n_stages, x, y, before_step=fired.clear)
        _check(name, stages, names, losses, want_losses, want_grads)
        for st in stages:
            for n, _ in st.submod.named_parameters():
                for kind in ("pre", "post", "accumulated", "tensor"):
                    got = fired[(kind, st.stage_index, n)]
                    assert got == N_MB, (f"{name}: {kind} hook of stage {st.stage_index}'s {n} fired {got} "
                                         f"times in a step of {N_MB} microbatches")
    return True


@pytest.mark.parametrize("traced", [pytest.param(True, marks=pytest.mark.slow), False], ids=["traced", "manual"])
def test_parameter_hooks_fire_once_per_microbatch_under_every_schedule(traced):
    assert all(run_ranks(_hooks, 2, traced, timeout_s=400))


# ------------------------------------------------------------------------------ dw_builder
class _Runners:
    """dw_builder per stage: counts builds and runs (picklable state lives in the rank)."""

    def __init__(self):
        self.built: Counter = Counter()
        self.ran: Counter = Counter()

    def builder_for(self, stage: int):
        def build():
            self.built[stage] += 1
            return lambda: self.ran.update([stage])
        return build


def _dw_builder(rank, world):
    x, y = torch.randn(8, 3, 8), torch.randn(8, 3, 8)
    for name in ALL:
        runners = _Runners()
        model, stages, names, n_stages = _stages(name, world, rank, False, x, dw_builder=runners.builder_for)
        want_losses, want_grads = _reference(model, x, y, double=False)
        losses = _step(name, stages, n_stages, x, y, steps=2)
        _check(name, stages, names, losses, want_losses, want_grads)
        for st in stages:
            s = st.stage_index
            assert runners.built[s] == runners.ran[s] == 2 * N_MB, (
                f"{name}: stage {s}'s dw_builder built {runners.built[s]} and ran {runners.ran[s]} runners "
                f"in 2 steps of {N_MB} microbatches, expected {2 * N_MB} each")
    return True


def test_dw_builder_runner_runs_once_per_microbatch_under_every_schedule():
    assert all(run_ranks(_dw_builder, 2, timeout_s=300))


def test_dw_builder_must_be_callable():
    with pytest.raises(TypeError, match="dw_builder must be a callable"):
        pp.PipelineStage(nn.Linear(2, 2), 0, 1, "cpu", dw_builder=3)


# ------------------------------------------------------------------------------ one stage, in process
def _split_vs_plain(fn, params: list, x: torch.Tensor):
    """Gradients of sum(fn(x) * g) for x and params: by one plain backward, and by I then W."""
    g = torch.randn_like(fn(x))
    out = {}
    for split in (False, True):
        for p in params:
            p.grad = None
        xr = x.clone().requires_grad_(True)
        y = fn(xr)
        if split:
            got, pending = backward.input_grads([y], [g], [xr])
            backward.weight_grads(pending)
            gx = got[0]
        else:
            y.backward(g)
            gx = xr.grad
        out[split] = (gx, [p.grad.clone() for p in params])
    return out[False], out[True]


class _Scale(torch.autograd.Function):
    """x * w as a Python autograd Function (the engine cannot call its node alone)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


def _cases():
    torch.manual_seed(0)
    lin, ln = nn.Linear(4, 4), nn.LayerNorm(4)
    w, v = nn.Parameter(torch.randn(4, 4) / 2), nn.Parameter(torch.rand(4) + 0.5)
    conv = nn.Conv1d(4, 4, 1)
    lstm, mha = nn.LSTM(4, 4, batch_first=True), nn.MultiheadAttention(4, 2, batch_first=True)
    return {
        "linear twice, 2-d": (lambda x: torch.tanh(lin(lin(x))), list(lin.parameters()), (3, 4)),
        "linear twice, 3-d": (lambda x: torch.tanh(lin(lin(x))), list(lin.parameters()), (2, 3, 4)),
        "layer norm twice": (lambda x: ln(ln(x) * 2.0), list(ln.parameters()), (2, 3, 4)),
        "x @ w @ w": (lambda x: x @ w @ w, [w], (3, 4)),
        "w.t() twice": (lambda x: (lambda wt: x @ wt @ wt)(w.t()), [w], (3, 4)),
        "one cast used twice": (lambda x: (lambda c: x @ c @ c)(w * 2.0), [w], (3, 4)),
        "mul and matmul": (lambda x: (x * v) @ w * v, [v, w], (3, 4)),
        "conv twice": (lambda x: conv(torch.tanh(conv(x))), list(conv.parameters()), (2, 4, 5)),
        "python function twice": (lambda x: _Scale.apply(_Scale.apply(x, v), v), [v], (3, 4)),
        "python function once": (lambda x: _Scale.apply(x, v) @ w, [v, w], (3, 4)),
        # nodes of several outputs on the input path (torch#170277: W summed their gradients into output 0)
        "chunks of one shape, one weight": (lambda x: (lambda a, b: a * v + b * v * 3)(*x.chunk(2, 0)), [v], (4, 4)),
        "python function, two outputs": (lambda x: (lambda a, b: a * 2 + b * 3)(*_TwoOut.apply(x, v)), [v], (3, 4)),
        "lstm, every output": (lambda x: (lambda o, hc: o * 2 + hc[0].transpose(0, 1) + hc[1].transpose(0, 1))(
            *lstm(x)), list(lstm.parameters()), (2, 1, 4)),
        "attention and its weights": (lambda x: (lambda o, a: o.sum(-1, keepdim=True) * a.sum(-1, keepdim=True))(
            *mha(x, x, x)), list(mha.parameters()), (2, 3, 4)),
    }


@pytest.mark.parametrize("mode", ["node-hooks", "tensor-hooks", "written-by-hand"])
@pytest.mark.parametrize("direct", [True, False], ids=["by-hand", "engine"])
@pytest.mark.parametrize("case", list(_cases()))
def test_input_then_weight_grads_count_each_use_once(case, direct, mode):
    """node-hooks: every parameter's AccumulateGrad node is hooked (the default W hands each gradient to
    autograd once); tensor-hooks and written-by-hand: NODE_HOOKS False, where W adds the gradients of
    parameters without tensor hooks into `.grad` itself."""
    fn, params, shape = _cases()[case]
    fired: Counter = Counter()
    keep, handles = [], []
    for i, p in enumerate(params):
        if mode == "node-hooks":
            keep.append(p.view_as(p).grad_fn.next_functions[0][0])
            handles.append(keep[-1].register_hook(lambda gi, go, i=i: fired.update([i])))
        elif mode == "tensor-hooks" and i % 2 == 0:
            handles.append(p.register_hook(lambda g, i=i: fired.update([i])))
    backward.DIRECT, backward.NODE_HOOKS = direct, mode == "node-hooks"
    try:
        (want_x, want), (got_x, got) = _split_vs_plain(fn, params, torch.randn(*shape))
    finally:
        backward.DIRECT = backward.NODE_HOOKS = True
        for h in handles:
            h.remove()
    torch.testing.assert_close(got_x, want_x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    hooked = {"node-hooks": range(len(params)), "tensor-hooks": range(0, len(params), 2)}.get(mode, ())
    assert fired == Counter({i: 2 for i in hooked})  # once in the plain backward, once in I+W


class _TwoOut(torch.autograd.Function):
    """(x * w, x + w) as a Python autograd Function: one node with two outputs and a weight."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w, x + w

    @staticmethod
    def backward(ctx, ga, gb):
        x, w = ctx.saved_tensors
        return ga * w + gb, (ga * x).sum(0) + gb.sum(0)


class _CastLinear(nn.Module):
    """A Linear whose weight goes through an op of its own first (as autocast's cast does)."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d) / d ** 0.5)

    def forward(self, x):
        return F.linear(x, self.w * 1.0)


def test_weight_grads_hand_over_large_stages_in_batches_each_parameter_once(monkeypatch):
    torch.manual_seed(0)
    blocks = nn.Sequential(*(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), _CastLinear(8)) for _ in range(4)))
    params = list(blocks.parameters())
    fired: Counter = Counter()
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda t, i=i: fired.update([i]))
    calls = []
    accumulate = backward._accumulate
    monkeypatch.setattr(backward, "_accumulate", lambda seeds: calls.append(len(seeds)) or accumulate(seeds))
    monkeypatch.setattr(backward, "FLUSH_BYTES", 1)   # hand over as soon as anything is complete
    (want_x, want), (got_x, got) = _split_vs_plain(blocks, params, torch.randn(2, 3, 8))
    torch.testing.assert_close(got_x, want_x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert fired == Counter({i: 2 for i in range(len(params))})   # once by the plain backward, once by W
    assert len(calls) > 4, f"W handed its gradients over in {len(calls)} call(s), expected one per split node"
