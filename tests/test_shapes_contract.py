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
from pp.testing import run_ranks

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
    """Per-microbatch losses and the gradient of the batch's mean loss, accumulated microbatch by
    microbatch (as gradient accumulation does, each under its own autocast region: bf16 casts are not
    shared), each microbatch's loss weighted by its share of the batch's rows (8 rows in 3 microbatches:
    3/8, 3/8, 2/8), which is the unsplit model's mean over the whole batch."""
    ref = copy.deepcopy(model)
    losses = []
    for xc, yc in zip(x.tensor_split(n_mb), y.tensor_split(n_mb)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = flat_mse(ref(xc), yc)
        (loss * (xc.shape[0] / x.shape[0])).backward()
        losses.append(loss.detach())
    return torch.stack(losses), {n: p.grad for n, p in ref.named_parameters()}


def unsplit_grads(model, x, y):
    """The gradient of the whole batch's loss through the unsplit model."""
    ref = copy.deepcopy(model)
    flat_mse(ref(x), y).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


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
    whole = None if autocast else unsplit_grads(model, x, y)
    for s in stages:
        for n, p in s.submod.named_parameters():
            torch.testing.assert_close(p.grad, want_grads[n], msg=lambda m: f"{tuple(x.shape)} {n}: {m}", **kw)
            if whole is not None:   # uneven microbatches too: the unsplit batch's gradient, not a mean of means
                torch.testing.assert_close(p.grad, whole[n], atol=1e-6, rtol=1e-4,
                                           msg=lambda m: f"{tuple(x.shape)} {n} against the unsplit batch: {m}")
    if n_stages - 1 in held:
        torch.testing.assert_close(torch.stack(losses), want_losses, **kw)


# (batch, sequence length) of each step; traced with one microbatch of 3 rows of length 6
SHAPES = [(8, 6), (8, 9), (8, 4), (6, 9), (8, 6)]


def _view_model_and_pipes():
    torch.manual_seed(0)
    model = ViewModel()
    return model, _pipes(model, torch.randn(3, 6, 8))


def _all_cases(rank, world):
    """Every 2-rank case of this file in one run: the ViewModel cases share one trace per stage count
    (tracing dominates them; no case trains the weights, and each zeroes its stages' gradients).
    `_eval_and_step` goes last of them: it ends by handing the 2-stage pipe to pp.parallelize."""
    model, pipes = _view_model_and_pipes()
    return {"other shapes": _other_shapes(rank, world, model, pipes),
            "autocast": _autocast(rank, world, model, pipes),
            "eval and step": _eval_and_step(rank, world, model, pipes),
            "length": _refused(rank, world, 3, (9, 9)),
            "one row": _refused(rank, world, 1, (6, 6))}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_all_cases, 2, timeout_s=300)


def _other_shapes(rank, world, model, pipes):
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


def test_traced_stages_take_other_batch_sizes_and_lengths_on_every_schedule(ranks):
    """Traced on a 3 x 6 microbatch, then batches of 8 (chunks 3, 3, 2) at lengths 6, 9, 4, and 6 x 9
    (chunks of 2 x 9 = 18 = 3 x 6 rows: a view frozen to the example's sizes would fit, silently wrong)."""
    assert ranks[0]["other shapes"] == ALL


# --- shapes the traced model cannot take: a ValueError on stage 0 before anything is sent ----------------

class FixedLength(nn.Module):
    """A learned position table of 6 rows added to the input: the model itself fixes the length at 6."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(6, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x) + self.pos)
        pp.pipe_split()
        return self.head(h)


def _refused(rank, world, example_rows, bad_batch):
    torch.manual_seed(0)
    model = FixedLength()
    pipe = pp.pipeline(model, (torch.randn(example_rows, 6, 8),))
    stage = pipe.build_stage(rank, "cpu")
    sched = pp.Schedule1F1B(stage, 3, loss_fn=flat_mse)
    x, y = torch.randn(*bad_batch, 8), torch.randn(*bad_batch, 3)
    try:
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
    except (ValueError, RuntimeError) as e:
        error = (type(e).__name__, str(e))
    else:
        error = None
    # the schedule is still good for shapes the model takes
    good = (3 * example_rows, 6)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(*good, 8, generator=gen), torch.randn(*good, 3, generator=gen)
    _step_and_compare(rank, model, [stage], sched, 2, x, y)
    return error


def test_a_length_the_model_fixes_is_refused_before_any_transfer(ranks):
    rank0, rank1 = (r["length"] for r in ranks)
    assert rank0 == ("ValueError", "stage 0 input 0 ('x'): expected a float32 tensor of shape (*, 6, 8), got a "
                     "float32 tensor of shape (3, 9, 8): dimension 1 must be 6; the traced model fixes this size")
    assert rank1[0] == "RuntimeError" and "rank 0 refused the step (ValueError: stage 0 input 0 ('x'): " \
        "expected a float32 tensor of shape (*, 6, 8)" in rank1[1], rank1[1]


def test_a_batch_dimension_traced_at_one_row_is_refused_with_the_reason(ranks):
    rank0 = ranks[0]["one row"]
    assert rank0[0] == "ValueError" and rank0[1].startswith(
        "stage 0 input 0 ('x'): expected a float32 tensor of shape (1, 6, 8), got a float32 tensor of shape "
        "(2, 6, 8): dimension 0 must be 1; torch.export fixes every dimension of size 0 or 1")


class Pairs(nn.Module):
    """Reads its rows in pairs (`reshape(b // 2, 2, -1)`): the traced graph is only valid for even b."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(8, 2)

    def forward(self, x, mask):
        h = torch.tanh(self.a(x)) * mask.unsqueeze(-1)
        pp.pipe_split()
        return self.b(h.reshape(h.shape[0] // 2, 2, -1).flatten(1))


def test_the_model_s_shape_conditions_are_checked_and_named():
    from pp.stage.contract import check_shapes, spec_of

    torch.manual_seed(0)
    model = Pairs()
    pipe = pp.pipeline(model, (torch.randn(4, 4), torch.ones(4)))
    nodes = [n for n in pipe.get_stage_module(0).graph.nodes if n.op == "placeholder"]
    specs = [spec_of(f"input {i} ({n.name!r})", n.meta["val"], n.name) for i, n in enumerate(nodes)]
    guards = pipe.info().shape_guards
    x, mask = torch.randn(6, 4), torch.rand(6)
    check_shapes(0, specs, [x, mask], guards)
    torch.testing.assert_close(pipe(x, mask)[0], model(x, mask))   # 6 rows: other sizes than traced work
    with pytest.raises(ValueError, match=r"^stage 0 inputs do not meet the traced model's shape condition .*"
                                         r"x\.shape\[0\] = 5"):
        pipe(torch.randn(5, 4), torch.ones(5))   # called directly too: an odd batch is refused, not run
    with pytest.raises(ValueError, match=r"^stage 0 inputs do not meet the traced model's shape condition "
                                         r".*x\.shape\[0\].* \(here x\.shape\[0\] = 5; input 0 \('x'\) traced as "
                                         r"a float32 tensor of shape \(\*, 4\)"):
        check_shapes(0, specs, [torch.randn(5, 4), torch.ones(5)], guards)
    with pytest.raises(ValueError, match=r"^stage 0 input 1 \('mask'\): expected a float32 tensor of shape "
                                         r"\(\*\), got a float32 tensor of shape \(4\): dimension 0 must equal "
                                         r"x\.shape\[0\], which is 6$"):
        check_shapes(0, specs, [x, torch.ones(4)], guards)


def test_a_size_of_one_that_the_trace_cannot_cover_says_what_to_send():
    """A microbatch of 1 row (6 rows in 4 microbatches) fails the traced condition x.shape[0] >= 2; the
    message told the user to trace with an example of that size, which torch.export cannot do."""
    from pp.stage.contract import check_shapes, spec_of

    pipe = pp.pipeline(nn.Sequential(nn.Linear(4, 4)), (torch.randn(4, 4),))
    nodes = [n for n in pipe.get_stage_module(0).graph.nodes if n.op == "placeholder"]
    specs = [spec_of(f"input {i} ({n.name!r})", n.meta["val"], n.name) for i, n in enumerate(nodes)]
    guards = pipe.info().shape_guards
    if not guards:
        pytest.skip("this torch keeps no lower bound for the traced batch size")
    with pytest.raises(ValueError, match=r"send sizes of at least 2 there \(.*shape\[0\]; torch.export traces a "
                                         r"size of 0 or 1 only as a fixed size.*at least 2 rows, or fewer "
                                         r"microbatches\)$"):
        check_shapes(0, specs, [torch.randn(1, 4)], guards)


# --- eval() and step() in any order on one schedule ------------------------------------------------------

def _eval_and_step(rank, world, model, pipes):
    runs = []
    for name in ("1F1B", "Interleaved1F1B", "parallelize"):
        if name == "parallelize":
            par = pp.parallelize(pipes[2], n_microbatches=3, loss_fn=flat_mse, device="cpu")
            stages, sched, n_stages = par.stages, par, 2
        else:
            stages, sched, n_stages = _stages(pipes, name, world, rank)
        held = {s.stage_index for s in stages}
        # eval first, then step; step, eval (other shapes), step (the shapes of the first step), ...
        for kind, (b, t) in [("eval", (8, 6)), ("step", (8, 6)), ("eval", (8, 9)), ("step", (8, 6)),
                             ("eval", (8, 6)), ("step", (8, 4)), ("step", (8, 4))]:
            gen = torch.Generator().manual_seed(b * 100 + t)
            x, y = torch.randn(b, t, 8, generator=gen), torch.randn(b, t, 3, generator=gen)
            if kind == "step":
                _step_and_compare(rank, model, stages, sched, n_stages, x, y)
            else:
                out = sched.eval(*((x,) if 0 in held else ()))
                if n_stages - 1 in held:
                    with torch.no_grad():
                        torch.testing.assert_close(out, model(x), msg=lambda m: f"{name} eval {b}x{t}: {m}")
            runs.append((name, kind, b, t))
    return runs


def test_eval_and_step_in_any_order_match_the_unsplit_model(ranks):
    runs = ranks[0]["eval and step"]
    assert len(runs) == 21


# --- step() under torch.autocast ---------------------------------------------------------------------------

def _autocast(rank, world, model, pipes):
    for name in ("1F1B", "Interleaved1F1B", "ZBVZeroBubble"):
        stages, sched, n_stages = _stages(pipes, name, world, rank)
        for b, t in [(8, 6), (8, 9)]:
            gen = torch.Generator().manual_seed(b * 100 + t)
            x, y = torch.randn(b, t, 8, generator=gen), torch.randn(b, t, 3, generator=gen)
            _step_and_compare(rank, model, stages, sched, n_stages, x, y, autocast=True)
    return True


def test_step_under_autocast_matches_the_unsplit_model_under_autocast(ranks):
    """Activations cross the cut in bfloat16; the ops are the unsplit model's, so the numbers are too."""
    assert all(r["autocast"] for r in ranks)


def test_pipeline_dynamic_false_fixes_the_example_s_sizes_and_gives_the_same_results():
    """pp.run traces with dynamic=False (one microbatch shape, half the tracing time): same numbers at that
    shape, and another shape is refused by name instead of running a graph specialised to the example."""
    from pp.stage.contract import check_shapes, spec_of

    torch.manual_seed(0)
    model = Pairs()
    x, mask = torch.randn(4, 4), torch.ones(4)
    fixed = pp.pipeline(model, (x, mask), dynamic=False)
    symbolic = pp.pipeline(model, (x, mask))
    torch.testing.assert_close(fixed(x, mask)[0], model(x, mask), rtol=0, atol=0)
    torch.testing.assert_close(fixed(x, mask)[0], symbolic(x, mask)[0], rtol=0, atol=0)
    nodes = [n for n in fixed.get_stage_module(0).graph.nodes if n.op == "placeholder"]
    specs = [spec_of(f"input {i} ({n.name!r})", n.meta["val"], n.name) for i, n in enumerate(nodes)]
    check_shapes(0, specs, [x, mask], fixed.info().shape_guards)
    with pytest.raises(ValueError, match=r"^stage 0 input 0 \('x'\): expected a float32 tensor of shape \(4, 4\), "
                                         r"got a float32 tensor of shape \(6, 4\): dimension 0 must be 4"):
        check_shapes(0, specs, [torch.randn(6, 4), torch.ones(6)], fixed.info().shape_guards)


class _MeanOverRows(nn.Module):
    """Divides by the batch size it reads: traced at fixed sizes that size is the example's, so calling
    the pipe on fewer rows would silently halve the result (found by a fresh-user check)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x, y):
        h = torch.relu(self.a(x))
        pp.pipe_split()
        return (self.b(h) + y).sum(0) / x.shape[0]


def test_calling_a_pipe_checks_its_inputs_like_step():
    torch.manual_seed(0)
    model = _MeanOverRows()
    x, y = torch.randn(4, 8), torch.randn(4, 3)
    fixed = pp.pipeline(model, (x, y), dynamic=False)
    torch.testing.assert_close(fixed(x, y)[0], model(x, y))
    with pytest.raises(ValueError, match=r"^stage 0 input 0 \('x'\): expected a float32 tensor of shape \(4, 8\), "
                                         r"got a float32 tensor of shape \(2, 8\): dimension 0 must be 4"):
        fixed(x[:2], y[:2])
    symbolic = pp.pipeline(model, (x, y))
    torch.testing.assert_close(symbolic(x[:2], y[:2])[0], model(x[:2], y[:2]))   # the default takes other sizes
    tokens = pp.pipeline(nn.Embedding(10, 4), (torch.zeros(2, 3, dtype=torch.long),), dynamic=False)
    with pytest.raises(ValueError, match=r"expected an int64 tensor of shape \(2, 3\), got an int64 tensor"):
        tokens(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match=r"pipeline\(dynamic=\.\.\.\) takes True or False, got 'no'"):
        pp.pipeline(model, (x, y), dynamic="no")


class _MaskByTime(nn.Module):
    """Takes a (T, B) mask: one microbatch of it, sliced along dim 1, is a strided view."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, tmask):
        h = torch.tanh(self.a(x)) * tmask.t().unsqueeze(-1)
        pp.pipe_split()
        return self.c(h)


def test_a_strided_example_still_traces_with_variable_sizes():
    """A strided example (tmask[:, :2]) made torch.export's variable-size trace fail inside torch; pp fell
    back to fixed sizes without a word and then refused batch 4 saying the model fixes that size."""
    torch.manual_seed(0)
    model = _MaskByTime()
    x, tmask = torch.randn(8, 6, 8), torch.rand(6, 8)
    pipe = pp.pipeline(model, (x[:2],), {"tmask": tmask[:, :2]})
    torch.testing.assert_close(pipe(x[:4], tmask=tmask[:, :4])[0], model(x[:4], tmask=tmask[:, :4]))


class _ConcreteSizesOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        if not isinstance(x.shape[0], int):
            raise RuntimeError("this model needs concrete sizes")
        h = self.a(x)
        pp.pipe_split()
        return self.b(h)


def test_a_model_traced_at_fixed_sizes_says_why():
    with pytest.warns(UserWarning, match=r"torch.export could not trace _ConcreteSizesOnly with variable sizes "
                                         r"\(RuntimeError: this model needs concrete sizes\), so it was traced at "
                                         r"the example's sizes: its stages take exactly those shapes"):
        pipe = pp.pipeline(_ConcreteSizesOnly(), (torch.randn(2, 4),))
    with pytest.raises(ValueError, match="dimension 0 must be 2"):
        pipe(torch.randn(3, 4))
