"""torch.distributed.pipelining's public API behaviours on pp (issue 15 items 3, 6, 7; issue 14 item 8):
each checked against the unsplit model and, where it is torch's API behaviour, against torch itself."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.testing import run_ranks
from runtime_models import DeepMLP, _manual_name, manual_stage_module, reference


def _torch_schedule(model, rank, world, n_mb, loss_fn=F.mse_loss):
    """torch.distributed.pipelining's GPipe on the same manual cut (tests may import torch's pipelining)."""
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    stage = PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, torch.device("cpu"))
    return ScheduleGPipe(stage, n_mb, loss_fn=loss_fn)


def _pp_schedule(model, rank, world, n_mb, cls=pp.ScheduleGPipe, loss_fn=F.mse_loss):
    stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, "cpu")
    return cls(stage, n_mb, loss_fn=loss_fn), stage


def _returns_and_eval_losses(rank: int, world: int) -> bool:
    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    first, last = rank == 0, rank == world - 1
    inputs = (x,) if first else ()
    want_losses, _ = reference(model, x, y, 4)
    with torch.no_grad():
        want_out = model(x)
    got = {}
    for name, make in (("pp", lambda: _pp_schedule(model, rank, world, 4)[0]),
                       ("torch", lambda: _torch_schedule(model, rank, world, 4))):
        sched = make()
        losses: list = ["stale"]
        out = sched.step(*inputs, target=y if last else None, losses=losses)
        skipped = sched.step(*inputs, target=y if last else None, losses=losses, return_outputs=False)
        eval_losses: list = []  # a fresh schedule: eval after step on one schedule is issue 14's item 4
        eval_out = make().eval(*inputs, target=y if last else None, losses=eval_losses)
        got[name] = (out, skipped, losses, eval_out, eval_losses)
    if last:
        out, skipped, losses, eval_out, eval_losses = got["pp"]
        torch.testing.assert_close(out, want_out)                 # merged output with a loss_fn
        assert skipped is None                                     # return_outputs=False
        assert len(losses) == 4 and "stale" not in losses          # cleared, then one per microbatch
        torch.testing.assert_close(eval_out, want_out)
        torch.testing.assert_close(torch.stack(eval_losses), want_losses)  # eval: one loss per microbatch
        t_out, t_skipped, t_losses, t_eval_out, t_eval_losses = got["torch"]
        torch.testing.assert_close(out, t_out)
        assert t_skipped is None
        torch.testing.assert_close(torch.stack(losses), torch.stack(t_losses))
        torch.testing.assert_close(eval_out, t_eval_out)
        torch.testing.assert_close(torch.stack(eval_losses), torch.stack(t_eval_losses))
    else:
        assert all(v is None for v in (got["pp"][0], got["pp"][1], got["pp"][3]))
    return True


def test_step_returns_merged_output_and_eval_fills_losses_as_torch():
    assert run_ranks(_returns_and_eval_losses, 2) == [True, True]


def _unknown_keyword(rank: int, world: int, traced: bool) -> str:
    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    if traced:
        pipe = pp.pipeline(model, (x[:2],), split_policy=pp.split_into_equal_size(world))
        sched = pp.ScheduleGPipe(pipe.build_stage(rank, "cpu"), 4, loss_fn=F.mse_loss)
    else:
        sched, _ = _pp_schedule(model, rank, world, 4)
    last = rank == world - 1
    try:
        sched.step(x, target=y, retrun_outputs=False)   # a typo on every rank
        return "no error"
    except (TypeError, RuntimeError) as e:
        message = f"{type(e).__name__}: {e}"
    # Nothing was sent: the next step runs and is right.
    losses: list = []
    sched.step(x, target=y if last else None, losses=losses)
    if last:
        torch.testing.assert_close(torch.stack(losses), reference(model, x, y, 4)[0])
    return message


@pytest.mark.parametrize("traced", [True, False], ids=["traced", "manual"])
def test_unknown_keywords_are_refused_on_every_rank_before_any_transfer(traced):
    messages = run_ranks(_unknown_keyword, 2, traced)
    # A traced pipeline knows the model's forward on every rank; manual stages on the first stage's rank,
    # whose refusal reaches the other rank before anything is sent.
    assert "TypeError: step()/eval() got unknown keyword(s) ['retrun_outputs']" in messages[0]
    if traced:
        assert messages[1].startswith("TypeError: step()/eval() got unknown keyword(s) ['retrun_outputs']")
    else:
        assert messages[1].startswith("RuntimeError: pipeline step aborted: rank 0 refused the step (TypeError: "
                                      "step()/eval() got unknown keyword(s) ['retrun_outputs']")


class WithExtra(nn.Module):
    """A model with a keyword tensor input of its own batch size (broadcast over the rows of x)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.bias = nn.Linear(2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, extra=None):
        h = torch.tanh(self.inp(x) + self.bias(extra).sum(0))
        return self.head(h)


class ExtraFirst(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.inp, self.bias = m.inp, m.bias

    def forward(self, x, extra=None):
        return torch.tanh(self.inp(x) + self.bias(extra).sum(0))


class ExtraLast(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.head = m.head

    def forward(self, h):
        return self.head(h)


def _keyword_split(rank: int, world: int) -> bool:
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    torch.manual_seed(0)
    model = WithExtra()
    x, t, y = torch.randn(16, 4), torch.randn(4, 2), torch.randn(16, 3)
    ref = copy.deepcopy(model)
    want = [F.mse_loss(ref(xc, extra=tc), yc) for xc, tc, yc in zip(x.chunk(4), t.chunk(4), y.chunk(4))]
    (sum(want) / 4).backward()
    results = {}
    for name, make_stage, make_sched in (("pp", pp.PipelineStage, pp.ScheduleGPipe),
                                         ("torch", PipelineStage, ScheduleGPipe)):
        mine = copy.deepcopy(model)
        part = ExtraFirst(mine) if rank == 0 else ExtraLast(mine)
        stage = make_stage(part, rank, world, torch.device("cpu"))
        sched = make_sched(stage, 4, loss_fn=F.mse_loss)
        losses: list = []
        sched.step(*((x,) if rank == 0 else ()), **({"extra": t} if rank == 0 else {}),
                   target=y if rank == 1 else None, losses=losses)
        results[name] = (losses, {n: p.grad for n, p in part.named_parameters()})
    ref_grads = dict(ref.named_parameters())
    for name, (losses, grads) in results.items():
        if rank == 1:
            torch.testing.assert_close(torch.stack(losses), torch.stack(want).detach(), msg=name)
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n].grad, msg=lambda m: f"{name} {n}: {m}")
    if rank == 0:  # a tensor with fewer rows than microbatches: one clear sentence, every rank stops
        with pytest.raises(ValueError, match=r"batch of 3 along dim 0 cannot be split into 4 microbatches "
                                             r"\(kwargs\['extra'\] has shape \(3, 2\)\)"):
            _pp_step_extra(model, rank, world, x, torch.randn(3, 2), y)
    else:
        with pytest.raises(RuntimeError, match="rank 0 refused the step"):
            _pp_step_extra(model, rank, world, x, None, y)
    return True


def _pp_step_extra(model, rank, world, x, t, y):
    mine = copy.deepcopy(model)
    part = ExtraFirst(mine) if rank == 0 else ExtraLast(mine)
    sched = pp.ScheduleGPipe(pp.PipelineStage(part, rank, world, "cpu"), 4, loss_fn=F.mse_loss)
    sched.step(*((x,) if rank == 0 else ()), **({"extra": t} if rank == 0 else {}), target=y if rank == 1 else None)


def test_keyword_tensors_are_split_on_their_own_batch_size_as_torch():
    assert run_ranks(_keyword_split, 2) == [True, True]


def _one_stage_per_rank(rank: int, world: int, name: str) -> bool:
    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    want_losses, want_grads = reference(model, x, y, 4)
    stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, "cpu")
    sched = getattr(pp, name)([stage], 4, loss_fn=F.mse_loss)
    losses: list = []
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None, losses=losses)
    if rank == world - 1:
        torch.testing.assert_close(torch.stack(losses), want_losses)
    per = 4 // world
    for n, p in stage.submod.named_parameters():
        parts = n.split(".")
        if parts[0] == "blocks":
            n = ".".join(["layers", str(rank * per + int(parts[1]))] + parts[2:])
        torch.testing.assert_close(p.grad, want_grads[n], msg=lambda m: f"{name} {n}: {m}")
    return True


@pytest.mark.parametrize("name", ["ScheduleInterleaved1F1B", "ScheduleLoopedBFS", "ScheduleInterleavedZeroBubble"])
@pytest.mark.parametrize("world", [1, 2])
def test_multi_stage_schedules_run_one_stage_per_rank(name, world):
    assert run_ranks(_one_stage_per_rank, world, name) == [True] * world


class LossAndLogits(nn.Module):
    """A model that returns its loss next to its logits, as Hugging Face models do."""

    def __init__(self, output: str):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)
        self.output = output

    def forward(self, x, labels):
        h = torch.tanh(self.a(x))
        pp.pipe_split()
        logits = self.b(h)
        loss = F.mse_loss(logits, labels)
        if self.output == "dict":
            return {"loss": loss, "logits": logits}
        from transformers.modeling_outputs import SequenceClassifierOutput
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _scalar_outputs(rank: int, world: int, output: str) -> bool:
    if output == "model_output":
        import transformers.modeling_outputs  # noqa: F401 - registers ModelOutput classes with pytree
    torch.manual_seed(0)
    model = LossAndLogits(output)
    x, labels = torch.randn(8, 4), torch.randn(8, 3)
    pipe = pp.pipeline(model, (x[:2], labels[:2]))
    sched = pp.ScheduleGPipe(pipe.build_stage(rank, "cpu"), 4)
    out = sched.eval(x, labels)
    if rank == world - 1:
        with torch.no_grad():
            want = model(x, labels)
        torch.testing.assert_close(out["logits"], want["logits"])
        torch.testing.assert_close(out["loss"], want["loss"])  # equal microbatches: the mean is the batch's
        if output == "model_output":
            assert type(out).__name__ == "SequenceClassifierOutput"
    else:
        assert out is None
    return True


@pytest.mark.parametrize("output", ["dict", "model_output"])
def test_eval_merges_a_scalar_loss_next_to_logits(output):
    assert run_ranks(_scalar_outputs, 2, output, timeout_s=300) == [True, True]  # transformers imports slowly


def _summed_losses(rank: int, world: int) -> bool:
    """A loss that states reduction="sum", on a batch that does not divide (10 rows in 4 microbatches:
    3, 3, 2, 2): the whole batch's summed gradient over n_microbatches, as torch gives, not the row-weighted
    mean pp uses for mean losses (which would fit neither the sum nor any multiple of it). torch scales by
    1 / n_microbatches too, but its schedules cannot take this batch (the targets split otherwise)."""
    import functools

    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    ref = copy.deepcopy(model)
    F.mse_loss(ref(x), y, reduction="sum").backward()
    want = {n: p.grad / 4 for n, p in ref.named_parameters()}
    ways = {"module": (nn.MSELoss(reduction="sum"), None),
            "partial": (functools.partial(F.mse_loss, reduction="sum"), None),
            "loss_kwargs": (F.mse_loss, {"reduction": "sum"})}
    got = {}
    for name, (loss_fn, loss_kwargs) in ways.items():
        sched, stage = _pp_schedule(model, rank, world, 4, cls=pp.Schedule1F1B, loss_fn=loss_fn)
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None, loss_kwargs=loss_kwargs)
        got[name] = {n: p.grad for n, p in stage.submod.named_parameters()}
    for name, grads in got.items():
        _check_stage_grads(grads, want, rank, 4 // world, name)
    return True


def _check_stage_grads(grads: dict, want: dict, rank: int, per: int, what: str = "") -> None:
    """A DeepMLP stage's gradients (`blocks.i...`, `per` blocks per rank) against the unsplit model's
    (`layers.j...`)."""
    for n, g in grads.items():
        parts = n.split(".")
        if parts[0] == "blocks":
            n = ".".join(["layers", str(rank * per + int(parts[1]))] + parts[2:])
        torch.testing.assert_close(g, want[n], msg=lambda m: f"{what} {n}: {m}")


def test_a_summed_loss_on_uneven_microbatches_gets_the_summed_gradient():
    assert run_ranks(_summed_losses, 2) == [True, True]


def _plain_sum(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((out - t) ** 2).sum()


def _plain_summed_loss(rank: int, world: int) -> dict:
    """A plain function that sums, on 10 rows in 4 microbatches: weighted by rows without a word before;
    now a warning names the assumption, and `fn.reduction = "sum"` gives the summed gradient."""
    import warnings

    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    ref = copy.deepcopy(model)
    _plain_sum(ref(x), y).backward()
    want = {n: p.grad / 4 for n, p in ref.named_parameters()}
    out = {}
    for stated in (False, True):
        def loss_fn(o, t):
            return _plain_sum(o, t)
        if stated:
            loss_fn.reduction = "sum"
        sched, stage = _pp_schedule(model, rank, world, 4, cls=pp.Schedule1F1B, loss_fn=loss_fn)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                for p in stage.submod.parameters():
                    p.grad = None
                sched.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None)
        out[stated] = [str(w.message) for w in caught if "states no reduction" in str(w.message)]
        if stated:
            _check_stage_grads({n: p.grad for n, p in stage.submod.named_parameters()}, want, rank, 4 // world)
    return out


def test_a_plain_summing_loss_on_uneven_microbatches_is_warned_about_and_can_state_its_reduction():
    first, last = run_ranks(_plain_summed_loss, 2)
    assert len(last[False]) == 1 and "loss_fn 'loss_fn' states no reduction" in last[False][0]   # once, not per step
    assert last[True] == [] and first[False] == first[True] == []   # the loss's rank alone weights it


def _token_mean(rank: int, world: int) -> bool:
    """docs/splitter.md's recipe for a mean over the tokens that are not ignored (-100), spread unevenly
    over the microbatches: a summed loss over the batch's token count with scale_grads=False gives the
    unsplit model's gradient of the batch's token mean."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 8), nn.Linear(8, 10)
    model = nn.Sequential(emb, nn.Tanh(), head)
    x = torch.randint(0, 10, (8, 5))
    y = torch.randint(0, 10, (8, 5))
    y[:2, 1:] = -100   # the first microbatch has far fewer tokens
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x).flatten(0, 1), y.flatten()).backward()
    n = (y != -100).sum()
    part = copy.deepcopy(model)[:2] if rank == 0 else copy.deepcopy(model)[2:]
    sched = pp.Schedule1F1B(pp.PipelineStage(part, rank, world, "cpu"), 4, scale_grads=False,
                            loss_fn=lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten(), reduction="sum") / n)
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
    want = dict(ref.named_parameters())   # a slice of a Sequential keeps its children's names
    for name, p in part.named_parameters():
        torch.testing.assert_close(p.grad, want[name].grad, msg=name)
    return True


def test_a_token_mean_with_ignored_tokens_as_the_docs_show():
    assert run_ranks(_token_mean, 2) == [True, True]


def _manual_grad_scaling(rank: int, world: int) -> list:
    """torch's pattern for scale_grads=False: the caller divides by the microbatch count with the stage's
    `scale_grads(n)`; `has_backward` says whether the last step ran backwards."""
    torch.manual_seed(0)
    model = DeepMLP(n_layers=2)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, "cpu")
    sched = pp.Schedule1F1B(stage, 4, loss_fn=F.mse_loss, scale_grads=False)
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
    flags = [stage.has_backward]
    for bad in (0, -2, "4", True):   # one sentence naming the value, gradients untouched
        with pytest.raises(ValueError, match=f"scale_grads takes a positive number .* got {bad!r}"):
            stage.scale_grads(bad)
    stage.scale_grads(4)
    grads = {_manual_name(n, rank, 1): p.grad.clone() for n, p in stage.submod.named_parameters()}
    sched.eval(*((x,) if rank == 0 else ()))
    flags.append(stage.has_backward)
    return [flags, grads]


def test_scale_grads_false_then_the_stages_scale_grads_equals_the_unsplit_mean():
    torch.manual_seed(0)
    model = DeepMLP(n_layers=2)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    _, want = reference(model, x, y, 4)
    got = run_ranks(_manual_grad_scaling, 2)
    for rank, (flags, grads) in enumerate(got):
        assert flags == [True, False], flags
        for name, g in grads.items():
            torch.testing.assert_close(g, want[name], msg=name)


def _target_rows(rank: int, world: int) -> list:
    """A target whose rows cannot follow the batch's into the microbatches (7 target rows for 8 samples)
    is refused on every rank before anything is sent (it trained silently on broadcast losses; found by
    a fresh-user check); a target flattened to one row per token of each sample still trains."""
    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 8), nn.Linear(8, 10)
    model = nn.Sequential(emb, nn.Tanh(), head)
    x, y = torch.randint(0, 10, (8, 5)), torch.randint(0, 10, (8, 5))
    part = copy.deepcopy(model)[:2] if rank == 0 else copy.deepcopy(model)[2:]
    sched = pp.Schedule1F1B(pp.PipelineStage(part, rank, world, "cpu"), 4,
                            loss_fn=lambda out, t: F.cross_entropy(out.flatten(0, 1), t))
    seen = []
    for rows in (35, 4):   # 4 rows for 8 samples splits proportionally (1 per 2) but is half a row each
        try:
            sched.step(*((x,) if rank == 0 else ()), target=y.flatten()[:rows] if rank == 1 else None)
        except ValueError as e:
            seen.append(str(e))
    sched.step(*((x,) if rank == 0 else ()), target=y.flatten() if rank == 1 else None)   # 40 = 8 x 5: fine
    ref = copy.deepcopy(model)
    torch.stack([F.cross_entropy(ref(a).flatten(0, 1), b.flatten()) for a, b in zip(x.chunk(4), y.chunk(4))]
                ).mean().backward()
    want = dict(ref.named_parameters())
    for name, p in part.named_parameters():
        torch.testing.assert_close(p.grad, want[name].grad, msg=name)
    return seen


def test_a_target_whose_rows_cannot_follow_the_batch_is_refused_on_every_rank():
    for seen in run_ranks(_target_rows, 2):
        rule = "each microbatch's target must hold the same whole number of rows for each of its samples"
        assert seen == [f"the target's 35 rows do not follow the batch's 8 into 4 microbatches (9, 9, 9, 8 target "
                        f"rows against 2, 2, 2, 2 batch rows): {rule}",
                        f"the target's 4 rows do not follow the batch's 8 into 4 microbatches (1, 1, 1, 1 target "
                        f"rows against 2, 2, 2, 2 batch rows): {rule}"]


def _flattened_uneven(rank: int, world: int) -> bool:
    """A target flattened to one row per token (50 rows for 10 samples of 5) over uneven microbatches (3,
    3, 2, 2 samples): each microbatch's target holds its own samples' 15, 15, 10, 10 tokens, not 50 rows
    split alone into 13, 13, 12, 12 (refused before; pairing tokens of other samples would be silently
    wrong). Gradients equal the unsplit model's token mean; a target tuple splits alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 8), nn.Tanh(), nn.Linear(8, 10))
    x, y = torch.randint(0, 10, (10, 5)), torch.randint(0, 10, (10, 5))
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x).flatten(0, 1), y.flatten()).backward()
    want = dict(ref.named_parameters())
    for target, loss_fn in ((y.flatten(), lambda out, t: F.cross_entropy(out.flatten(0, 1), t)),
                            ((y.flatten(), 7), lambda out, t: F.cross_entropy(out.flatten(0, 1), t[0]))):
        part = copy.deepcopy(model)[:2] if rank == 0 else copy.deepcopy(model)[2:]
        sched = pp.Schedule1F1B(pp.PipelineStage(part, rank, world, "cpu"), 4, loss_fn=loss_fn)
        sched.step(*((x,) if rank == 0 else ()), target=target if rank == 1 else None)
        for name, p in part.named_parameters():
            torch.testing.assert_close(p.grad, want[name].grad, msg=name)
    return True


def test_a_target_flattened_per_token_follows_uneven_microbatches():
    assert run_ranks(_flattened_uneven, 2) == [True, True]


def _forward_only_loop(rank: int, world: int) -> bool:
    """torch's forward-only test: the output goes back to the first rank by the caller's own send/recv
    between steps, twenty times; it must equal the unsplit model applied twenty times."""
    import torch.distributed as dist

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(world)])
    x = torch.randn(8, 6)
    stage = pp.PipelineStage(copy.deepcopy(model[rank]), rank, world, "cpu")
    sched = pp._ScheduleForwardOnly(stage, 4, scale_grads=False)
    out = None
    for _ in range(20):
        if rank == 0:
            assert sched.step(x) is None
            dist.recv(x, src=world - 1)
        else:
            out = sched.step()
            dist.send(out, dst=0)
    if rank != world - 1:
        return all(p.grad is None for p in stage.submod.parameters())
    want = x.clone()   # rank 1's x is the seeded batch as rank 0 began with it
    with torch.no_grad():
        for _ in range(20):
            want = model(want)
    torch.testing.assert_close(out.detach(), want)
    return all(p.grad is None for p in stage.submod.parameters())


def test_forward_only_schedule_between_the_callers_own_transfers_as_torch_tests_it():
    assert run_ranks(_forward_only_loop, 2, timeout_s=90) == [True, True]
