"""Train and eval mode of traced stages (pp.stage.modes). torch.export bakes the mode into the graph, so
`stage.submod.eval()` changed nothing: found in the field, `pp.run`'s validation of a GPT-2 (dropout 0.1)
ran with dropout on, and batch norm kept using and updating batch statistics. Checked against the unsplit
model in eval mode."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.testing import run_ranks


class DropNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.drop, self.c = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4)
        self.d = nn.Linear(4, 4)

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.a(x))))
        pp.pipe_split()
        return self.d(self.drop(self.c(h)))


def _model() -> DropNorm:
    torch.manual_seed(0)
    model = DropNorm()
    with torch.no_grad():   # running statistics away from their initial values
        model(torch.randn(16, 8))
    return model


def test_a_pipe_called_in_eval_mode_runs_the_eval_graph():
    model = _model()
    x = torch.randn(8, 8)
    pipe = pp.pipeline(model, (x[:4],))
    stats = model.bn.running_mean.clone()
    pipe.eval()
    want = copy.deepcopy(model).eval()(x)
    with torch.no_grad():
        torch.testing.assert_close(pipe(x)[0], want, rtol=0, atol=0)
        torch.testing.assert_close(pipe(x)[0], want, rtol=0, atol=0)
    assert torch.equal(model.bn.running_mean, stats)   # eval reads the running statistics, never updates them
    pipe.train()
    pipe(x)
    assert not torch.equal(model.bn.running_mean, stats)   # back in train mode: the train graph again


def _schedule_modes(rank: int, world: int) -> bool:
    model = _model()
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    want = [F.mse_loss(copy.deepcopy(model).eval()(a), b) for a, b in zip(x.chunk(2), y.chunk(2))]
    pipe = pp.pipeline(copy.deepcopy(model), (x[:4],))
    stage = pipe.build_stage(rank, "cpu")
    sched = pp.Schedule1F1B(stage, 2, loss_fn=F.mse_loss)
    inputs, target = ((x,) if rank == 0 else ()), (y if rank == 1 else None)
    sched.step(*inputs, target=target)   # train mode: dropout and batch statistics
    trained = {n: b.clone() for n, b in stage.submod.named_buffers()}
    stage.submod.eval()                  # what pp.run's evaluation does
    for _ in range(2):
        losses: list = []
        sched.eval(*inputs, target=target, losses=losses)
        if rank == 1:
            assert len(losses) == 2
    for n, b in stage.submod.named_buffers():
        assert torch.equal(b, trained[n]), n   # evaluation leaves the running statistics alone
    stage.submod.train()
    sched.step(*inputs, target=target)
    if rank == 0:
        assert not torch.equal(stage.submod.get_buffer("bn.running_mean"), trained["bn.running_mean"])

    # the eval-mode losses of the unsplit model, with the weights as they are now
    fresh = pp.pipeline(copy.deepcopy(model), (x[:4],))
    st = fresh.build_stage(rank, "cpu")
    st.submod.eval()
    losses = []
    pp.Schedule1F1B(st, 2, loss_fn=F.mse_loss).eval(*inputs, target=target, losses=losses)
    if rank == 1:
        torch.testing.assert_close(torch.stack(losses), torch.stack(want).detach(), rtol=0, atol=0)
    return True


def test_schedule_eval_after_submod_eval_equals_the_unsplit_model_in_eval_mode():
    assert run_ranks(_schedule_modes, 2) == [True, True]


def _traced_in_eval(rank: int, world: int) -> bool:
    model = _model().eval()
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    stage = pp.pipeline(model, (x[:4],)).build_stage(rank, "cpu")
    assert not stage.submod.training   # a stage starts in the mode its model was traced in
    sched = pp.Schedule1F1B(stage, 2, loss_fn=F.mse_loss)
    inputs, target = ((x,) if rank == 0 else ()), (y if rank == 1 else None)
    sched.step(*inputs, target=target)   # training in eval mode, as the unsplit model in eval mode would
    stage.submod.train()
    with pytest.raises((ValueError, RuntimeError), match=r"traced from a model in eval mode|refused the step"):
        sched.step(*inputs, target=target)
    stage.submod.eval()
    sched.step(*inputs, target=target)   # refused before it started: the schedule still works
    return True


def test_a_stage_traced_in_eval_mode_refuses_train_mode_on_every_rank():
    assert run_ranks(_traced_in_eval, 2) == [True, True]


def _gpt2(rank: int, world: int) -> list | None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, use_cache=False)
    lm = transformers.GPT2LMHeadModel(cfg)   # dropout 0.1 by default; built in train mode
    g = torch.Generator().manual_seed(1)
    ids, tgt = torch.randint(0, 64, (4, 8), generator=g), torch.randint(0, 64, (4, 8), generator=g)

    def loss(out, t):
        return F.cross_entropy(out.logits.flatten(0, 1), t.flatten())

    stage = pp.pipeline(lm, (), {"input_ids": ids[:2]},
                        split_spec={"transformer.h.1": pp.SplitPoint.BEGINNING}).build_stage(rank, "cpu")
    sched = pp.Schedule1F1B(stage, 2, loss_fn=loss)
    stage.submod.eval()
    losses: list = []
    sched.eval(**({"input_ids": ids} if rank == 0 else {}), target=tgt if rank == 1 else None, losses=losses)
    if rank == 0:
        return None
    lm.eval()
    with torch.no_grad():
        want = [loss(lm(input_ids=a), b) for a, b in zip(ids.chunk(2), tgt.chunk(2))]
    torch.testing.assert_close(torch.stack(losses), torch.stack(want))
    return [x.item() for x in losses]


def test_gpt2_with_dropout_evaluates_as_the_unsplit_model_in_eval_mode():
    assert run_ranks(_gpt2, 2, timeout_s=300)[1] is not None


class _TrainOnly(nn.Module):
    """Cannot be traced in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(4, 4), nn.Linear(4, 2), nn.Dropout(p)

    def forward(self, x):
        if not self.training:
            raise RuntimeError("this model has no eval mode")
        h = self.drop(self.a(x))
        pp.pipe_split()
        return self.b(h)


def test_a_model_that_cannot_be_traced_in_eval_mode():
    x = torch.randn(4, 4)
    plain = pp.pipeline(_TrainOnly(0.0), (x[:2],))   # dropout 0: no mode-dependent op in the graph
    plain.eval()
    with pytest.warns(UserWarning, match=r"stage 0 runs in eval mode, but the model could not be traced in that "
                                         r"mode \(.*this model has no eval mode\); its graph has no dropout"):
        plain(x)
    dropping = pp.pipeline(_TrainOnly(0.5), (x[:2],))
    dropping.eval()
    with pytest.raises(ValueError, match=r"stage 0 runs in eval mode, but the model could not be traced in that "
                                         r"mode .* has ops that depend on the mode"):
        dropping(x)


class _EvalRowLoop(nn.Module):
    """Eval-only code that loops over rows: its eval-mode graph fixes the batch size."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(4, 4), nn.Linear(4, 4), nn.Dropout(0.5)
        self.scale = torch.tensor([1.0, 2.0, 3.0, 4.0])   # a plain tensor attribute, not a buffer

    def forward(self, x):
        h = self.drop(self.a(x)) * self.scale
        if not self.training:
            h = torch.stack([h[i] / (1 + i) for i in range(h.shape[0])])
        pp.pipe_split()
        return self.b(h)


def test_the_other_modes_graph_checks_its_own_input_shapes():
    """Found by a helper: the eval graph fixed the batch size, but inputs were checked against the train
    graph only, and a batch of 8 came back with 2 rows."""
    torch.manual_seed(0)
    model = _EvalRowLoop()
    x = torch.randn(8, 4)
    pipe = pp.pipeline(model, (x[:2],))
    pipe.eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe(x[:2])[0], copy.deepcopy(model).eval()(x[:2]))
        with pytest.raises(ValueError, match="dimension 0 must be 2"):
            pipe(x)


class _Attn(nn.Module):
    """No dropout, batch norm or self.training code: both modes give one graph."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.out = nn.Linear(16, 48), nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (z.view(b, t, 4, 4).transpose(1, 2) for z in self.qkv(x).split(16, dim=-1))
        y = self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c))
        pp.pipe_split()
        return self.out(y)


def test_a_model_traced_in_eval_mode_without_mode_ops_trains():
    """Found by a helper: traced in eval mode (as from_pretrained leaves a model) and the model object
    dropped, its meta copy's train-mode trace differed in layout only, and .train() was refused."""
    torch.manual_seed(0)
    model = _Attn().eval()
    want = copy.deepcopy(model).train()
    x = torch.randn(2, 8, 16)
    pipe = pp.pipeline(copy.deepcopy(model), (x,))   # the traced object is gone after this line
    pipe.train()
    torch.testing.assert_close(pipe(x)[0], want(x))


class _TrainingBranch(nn.Module):
    """Its modes differ in Python code only (no dropout or batch-norm op), and it picks an op by the device
    its tensors are on (as Mixtral's router picks histc's dtype)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.training:
            h = h * 0.5
        if h.device.type == "meta":
            h = h + 1.0   # a branch the trace on the real device never takes
        pp.pipe_split()
        return self.b(h) * (3.0 if self.training else 1.0)


def test_a_dropped_model_whose_modes_differ_in_python_code_evaluates_in_eval_mode():
    """Found by a fresh-user run of pp.run: with the model gone after tracing (pp.run keeps only its
    stages) the eval-mode graph came from a meta copy, whose trace differs from the real one in layout,
    so only dropout and batch-norm ops were taken to tell the modes apart: a `self.training` branch (or
    Mixtral's router jitter, a uniform draw) ran in train mode during validation, silently. The copy is
    now traced in both modes, on the device the model was traced on."""
    import gc

    torch.manual_seed(0)
    model = _TrainingBranch()
    x = torch.randn(8, 8)
    want_eval = copy.deepcopy(model).eval()(x)
    want_train = model(x)
    pipe = pp.pipeline(model, (x[:4],))
    del model
    gc.collect()
    with torch.no_grad():
        pipe.eval()
        torch.testing.assert_close(pipe(x)[0], want_eval)
        pipe.train()
        torch.testing.assert_close(pipe(x)[0], want_train)
