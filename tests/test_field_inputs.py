"""Faults found by replaying other pipeline libraries' bug reports on pp, kept as regression tests: how a
batch, its keywords and its target are cut into microbatches, and in-place ops on what a stage is given.
Each right value comes from the unsplit model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.microbatch import TensorChunkSpec, _Replicate
from pp.testing import run_ranks

D = 6


def _check_grads(stage_mod: nn.Module, ref_mod: nn.Module) -> None:
    for (n, p), (_, q) in zip(stage_mod.named_parameters(), ref_mod.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{n}: {m}")


# ------------------------------------------------------------- in-place ops on a stage's inputs
class InplaceHead(nn.Module):
    """Rectifies its input in place before a linear layer (nn.ReLU(inplace=True) first, as many models)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.lin = nn.Linear(D, D)

    def forward(self, x):
        return self.lin(self.act(x))


def _inplace_run(rank: int, world: int, schedule: str) -> str:
    """Stage 0 rectifies the model's input in place, stage 1 the activation it receives; the loss
    masks the target in place (`t[t == 0] = -100`, a common padding mask): each microbatch is a view of
    the user's batch, so an in-place op on one bumped the version of all (autograd refused the backward),
    and a received activation was a leaf (in-place refused)."""
    torch.manual_seed(0)
    mods = [InplaceHead(), nn.Sequential(InplaceHead(), nn.Linear(D, 5))]
    ref = copy.deepcopy(nn.Sequential(*mods))
    x = torch.randn(8, D)
    y = torch.tensor([0, 1, 2, 0, 3, 4, 1, 0])   # every microbatch keeps a counted target

    def loss_fn(out, t):
        t[t == 0] = -100
        return F.cross_entropy(out, t)

    n_mb = 4
    ref_losses = [loss_fn(ref(xc.clone()), yc.clone()) for xc, yc in zip(x.tensor_split(n_mb), y.tensor_split(n_mb))]
    (sum(ref_losses) / n_mb).backward()
    stage = pp.PipelineStage(mods[rank], rank, world, "cpu")
    sched = getattr(pp, schedule)(stage, n_mb, loss_fn=loss_fn, scale_grads=True)
    # the token mean over microbatches of unequal counted tokens is pp's default: compare per-microbatch
    sched.scale_grads = False
    for m in mods[rank].parameters():
        m.grad = None
    losses: list = []
    sched.step(*((x.clone(),) if rank == 0 else ()), target=y.clone() if rank == 1 else None, losses=losses)
    for p in mods[rank].parameters():
        p.grad /= n_mb
    _check_grads(mods[rank], ref[rank])
    if rank == 1:
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses).detach())
    return "ok"


@pytest.mark.parametrize("schedule", ["ScheduleGPipe", "Schedule1F1B"])
def test_inplace_ops_on_inputs_targets_and_received_activations(schedule):
    assert run_ranks(_inplace_run, 2, schedule) == ["ok", "ok"]


def _inplace_traced(rank: int, world: int) -> str:
    """The same model traced and cut (pp.pipeline): the graph computes on the rectified input."""
    torch.manual_seed(0)
    model = nn.Sequential(InplaceHead(), InplaceHead(), nn.Linear(D, 5))
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, D), torch.tensor([0, 1, 2, 0, 3, 4, 1, 0])

    def loss_fn(out, t):
        t[t == 0] = -100
        return F.cross_entropy(out, t)
    ref_losses = [loss_fn(ref(xc.clone()), yc.clone()) for xc, yc in zip(x.tensor_split(4), y.tensor_split(4))]
    (sum(ref_losses) / 4).backward()
    with pytest.warns(UserWarning, match="modifies its input"):
        pipe = pp.pipeline(model, (x[:2].clone(),), split_spec={"1": pp.SplitPoint.BEGINNING})
    stage = pipe.build_stage(rank, "cpu")
    sched = pp.ScheduleGPipe(stage, 4, loss_fn=loss_fn, scale_grads=False)
    sched.step(*((x.clone(),) if rank == 0 else ()), target=y.clone() if rank == 1 else None)
    grads = dict(ref.named_parameters())
    for n, p in stage.submod.named_parameters():
        torch.testing.assert_close(p.grad / 4, grads[n].grad, msg=lambda m: f"{n}: {m}")
    return "ok"


def test_inplace_ops_on_a_traced_models_input_and_target():
    assert run_ranks(_inplace_traced, 2) == ["ok", "ok"]


# ------------------------------------------------------------------ a batch split along dim 1
class SeqFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x):   # (T, B, D)
        return self.lin(x).tanh()


def _seq_first_run(rank: int, world: int, target_kind: str) -> str:
    """A seq-first batch (T, B, D) split along dim 1 (args_chunk_spec): the target is cut along the batch
    as the input is, not along its first dim (with T a multiple of B that paired other samples' targets
    without a word)."""
    torch.manual_seed(0)
    T, B, n_mb = 8, 4, 2
    mods = [SeqFirst(), SeqFirst()]
    ref = copy.deepcopy(nn.Sequential(*mods))
    x = torch.randn(T, B, D)
    if target_kind == "seq_first":   # laid out as the input: (T, B, D)
        y = torch.randn(T, B, D)

        def loss_fn(out, t):   # flattened: a target cut along dim 0 has as many elements, so no shape error
            return F.mse_loss(out.reshape(-1), t.reshape(-1))
    else:   # one label per sample: (B,), batch on its only dim
        y = torch.randint(0, D, (B,))

        def loss_fn(out, t):
            return F.cross_entropy(out.mean(0), t)
    ref_losses = [loss_fn(ref(xc), yc) for xc, yc in zip(x.tensor_split(n_mb, dim=1),
                                                          y.tensor_split(n_mb, dim=1 if y.dim() > 1 else 0))]
    (sum(ref_losses) / n_mb).backward()
    stage = pp.PipelineStage(mods[rank], rank, world, "cpu")
    sched = pp.Schedule1F1B(stage, n_mb, loss_fn=loss_fn, args_chunk_spec=(TensorChunkSpec(1),))
    out = sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
    _check_grads(mods[rank], ref[rank])
    if rank == 1:   # the output merged along the batch's dim, as it was split: (T, B, D)
        torch.testing.assert_close(out, ref(x))
    return "ok"


@pytest.mark.parametrize("target_kind", ["seq_first", "labels"])
def test_target_follows_a_batch_split_along_dim_1(target_kind):
    assert run_ranks(_seq_first_run, 2, target_kind) == ["ok", "ok"]


def _seq_first_flat_target(rank: int, world: int) -> str:
    T, B = 8, 4
    stage = pp.PipelineStage(SeqFirst() if rank == 0 else nn.Sequential(SeqFirst(), nn.Linear(D, 3)), rank, world,
                             "cpu")
    sched = pp.Schedule1F1B(stage, 2, loss_fn=lambda o, t: F.cross_entropy(o.reshape(-1, 3), t),
                            args_chunk_spec=(TensorChunkSpec(1),))
    with pytest.raises(ValueError, match=r"target's 32 rows do not follow the batch's 4"):
        sched.step(*((torch.randn(T, B, D),) if rank == 0 else ()),
                   target=torch.randint(0, 3, (T * B,)) if rank == 1 else None)
    return "ok"


def test_a_flattened_target_of_a_batch_split_along_dim_1_is_refused():
    """Flattened seq-first (T*B,) the target's rows interleave the samples: no split along its first dim
    pairs them with their microbatch, so every rank refuses the step."""
    assert run_ranks(_seq_first_flat_target, 2) == ["ok", "ok"]


# --------------------------------------------------------------------- keywords of a step
class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, mask=None):
        h = self.lin(x)
        return h if mask is None else h * mask


def _kwargs_later_stages(rank: int, world: int) -> str:
    """Every stage's forward takes `mask=`; each rank passes it to step() (torch's runtime gives a rank's
    step keywords to all of its stages): the later stage used to run without it, silently."""
    torch.manual_seed(0)
    mods = [Masked(), Masked()]
    ref = copy.deepcopy(mods)
    x, y = torch.randn(8, D), torch.randn(8, D)
    mask = (torch.rand(8, D) > 0.5).float()
    n_mb = 4
    for xc, mc, yc in zip(x.tensor_split(n_mb), mask.tensor_split(n_mb), y.tensor_split(n_mb)):
        (F.mse_loss(ref[1](ref[0](xc, mask=mc), mask=mc), yc) / n_mb).backward()
    stage = pp.PipelineStage(mods[rank], rank, world, "cpu")
    sched = pp.Schedule1F1B(stage, n_mb, loss_fn=F.mse_loss)
    sched.step(*((x,) if rank == 0 else ()), mask=mask, target=y if rank == 1 else None)
    _check_grads(mods[rank], ref[rank])
    return "ok"


def test_step_keywords_reach_every_stage_of_the_rank_as_in_torch():
    assert run_ranks(_kwargs_later_stages, 2) == ["ok", "ok"]


def _kwargs_not_taken(rank: int, world: int) -> str:
    """The same call on every rank, `step(x, mask=m, target=y)`, where only the first stage takes `mask`:
    the later stage is not given a keyword its forward does not take."""
    torch.manual_seed(0)
    mods = [Masked(), nn.Linear(D, D)]
    ref = copy.deepcopy(mods)
    x, y = torch.randn(8, D), torch.randn(8, D)
    mask = (torch.rand(8, D) > 0.5).float()
    for xc, mc, yc in zip(x.tensor_split(2), mask.tensor_split(2), y.tensor_split(2)):
        (F.mse_loss(ref[1](ref[0](xc, mask=mc)), yc) / 2).backward()
    stage = pp.PipelineStage(mods[rank], rank, world, "cpu")
    pp.ScheduleGPipe(stage, 2, loss_fn=F.mse_loss).step(x, mask=mask, target=y)
    _check_grads(mods[rank], ref[rank])
    return "ok"


def test_same_step_call_on_every_rank_gives_each_stage_the_keywords_it_takes():
    assert run_ranks(_kwargs_not_taken, 2) == ["ok", "ok"]


def _kwargs_only_on_first_rank(rank: int, world: int) -> str:
    """The mask given to the first rank only: the later stage runs without it (as in torch), and is named
    in a warning once, not at every step."""
    import warnings

    stage = pp.PipelineStage(Masked(), rank, world, "cpu")
    sched = pp.Schedule1F1B(stage, 2, loss_fn=F.mse_loss)
    x, y, mask = torch.randn(4, D), torch.randn(4, D), torch.ones(4, D)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            sched.step(*((x,) if rank == 0 else ()), **({"mask": mask} if rank == 0 else {}),
                       target=y if rank == 1 else None)
    named = [str(w.message) for w in seen if "step() on this rank was not given" in str(w.message)]
    assert len(named) == (1 if rank == 1 else 0), named
    assert rank == 0 or "stage 1's forward takes ['mask']" in named[0]
    return "ok"


def test_a_keyword_only_the_first_rank_got_is_named_for_a_later_stage_that_takes_it():
    assert run_ranks(_kwargs_only_on_first_rank, 2) == ["ok", "ok"]


class VarLen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, cu_seqlens=None):
        return self.lin(x) * (1.0 if cu_seqlens is None else cu_seqlens[-1].float() / 10)


def _kwarg_rows(rank: int, world: int) -> str:
    """cu_seqlens (B + 1 entries) is no per-sample tensor: split along dim 0 into 4 microbatches it would
    give each a meaningless piece. Refused with a sentence naming it; given whole with _Replicate. (A
    tensor that splits evenly is a batch of its own, cut as torch cuts it: test_torch_api_compat.py.)"""
    torch.manual_seed(0)
    x, y = torch.randn(4, D), torch.randn(4, D)
    cu = torch.tensor([0, 3, 5, 8, 10])
    stage = pp.PipelineStage(VarLen() if rank == 0 else nn.Linear(D, D), rank, world, "cpu")
    sched = pp.ScheduleGPipe(stage, 4, loss_fn=F.mse_loss)
    with pytest.raises(ValueError if rank == 0 else RuntimeError,
                       match=r"kwargs\['cu_seqlens'\] has 5 rows along dim 0, but the batch has 4 .*"
                             r"pieces of 2, 1, 1, 1 rows"):
        sched.step(*((x,) if rank == 0 else ()), **({"cu_seqlens": cu} if rank == 0 else {}),
                   target=y if rank == 1 else None)
    sched = pp.ScheduleGPipe(stage, 4, loss_fn=F.mse_loss, kwargs_chunk_spec={"cu_seqlens": _Replicate})
    sched.step(*((x,) if rank == 0 else ()), **({"cu_seqlens": cu} if rank == 0 else {}),
               target=y if rank == 1 else None)
    return "ok"


def test_a_keyword_without_one_row_per_sample_is_refused_unless_replicated():
    assert run_ranks(_kwarg_rows, 2) == ["ok", "ok"]


def test_a_keyword_of_k_rows_per_sample_follows_the_batch():
    """position ids flattened to one row per token (B*T rows): 10 samples in 4 microbatches are 3, 3, 2, 2,
    so their rows are 3T, 3T, 2T, 2T (an even split of the 10T rows would pair other samples')."""
    from pp.schedules.split_batch import split_batch

    B, T = 10, 3
    x = torch.arange(B).float().unsqueeze(1)
    pos = torch.arange(B).repeat_interleave(T)
    mb_args, mb_kwargs, rows = split_batch((x,), {"pos": pos}, 4)
    assert rows == B
    for a, k in zip(mb_args, mb_kwargs):
        assert torch.equal(a[0].squeeze(1).long().repeat_interleave(T), k["pos"])


def _one_rank_two_stages(rank: int, world: int, device: str) -> str:
    """Both stages on one rank (interleaved 1F1B), on `device`: the activation handed from stage 0 to
    stage 1 locally is rectified in place, the first stage's input too, the target masked in place and a
    keyword given to both stages; against the unsplit model on the same device."""
    torch.manual_seed(0)
    mods = [Masked(), nn.Sequential(InplaceHead(), nn.Linear(D, 5))]
    mods[0].lin = nn.Sequential(nn.ReLU(inplace=True), mods[0].lin)
    mods = [m.to(device) for m in mods]
    ref = copy.deepcopy(mods)
    x, mask = torch.randn(8, D, device=device), (torch.rand(8, D, device=device) > 0.3).float()
    y = torch.tensor([0, 1, 2, 0, 3, 4, 1, 0], device=device)

    def loss_fn(out, t):
        t[t == 0] = -100
        return F.cross_entropy(out, t)
    ref_losses = [loss_fn(ref[1](ref[0](xc.clone(), mask=mc)), yc.clone())
                  for xc, mc, yc in zip(x.tensor_split(4), mask.tensor_split(4), y.tensor_split(4))]
    (sum(ref_losses) / 4).backward()
    stages = [pp.PipelineStage(m, s, 2, device) for s, m in enumerate(mods)]
    sched = pp.ScheduleInterleaved1F1B(stages, 4, loss_fn=loss_fn, scale_grads=False)
    losses: list = []
    sched.step(x.clone(), mask=mask, target=y.clone(), losses=losses)
    for m, r in zip(mods, ref):
        for p in m.parameters():
            p.grad /= 4
        _check_grads(m, r)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses).detach())
    return "ok"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_field_faults_with_two_stages_on_one_rank(device):
    assert run_ranks(_one_rank_two_stages, 1, device) == ["ok"]


def test_a_pooled_output_of_a_batch_split_along_dim_1_merges_along_its_batch():
    """Outputs (T, b_m, D) merge along dim 1; a pooled (b_m, C) output along dim 0, even or uneven."""
    from pp.microbatch import merge_chunks, split_sizes

    for B, n in ((4, 2), (7, 4)):
        rows = split_sizes(B, n)
        seq = [torch.randn(5, r, 3) for r in rows]
        pooled = [torch.randn(r, 3) for r in rows]
        out = merge_chunks([(s, p) for s, p in zip(seq, pooled)], None, default_dim=1, chunk_rows=rows)
        assert out[0].shape == (5, B, 3) and out[1].shape == (B, 3)
        torch.testing.assert_close(out[1], torch.cat(pooled))


def test_a_keyword_longer_than_the_batch_is_refused_even_where_it_splits_evenly():
    """cu_seqlens of B + 1 = 8 entries for 7 samples in 4 microbatches splits evenly, yet belongs to no
    microbatch: refused (a smaller tensor that splits evenly is a batch of its own, as torch cuts it)."""
    from pp.schedules.split_batch import split_batch

    with pytest.raises(ValueError, match=r"kwargs\['cu_seqlens'\] has 8 rows along dim 0, but the batch has 7"):
        split_batch((torch.randn(7, 2),), {"cu_seqlens": torch.arange(8)}, 4)
    _, kw, _ = split_batch((torch.randn(16, 2),), {"extra": torch.randn(4, 2)}, 4)
    assert [k["extra"].shape[0] for k in kw] == [1, 1, 1, 1]


def test_inplace_op_on_inputs_that_carry_the_callers_graph():
    """x = x0 * scale (requires grad, not a leaf) rectified in place by the first stage: each microbatch is
    its own intermediate, as in the unsplit model (their shared version counter failed the backward)."""
    assert run_ranks(_caller_graph_inplace, 2) == ["ok", "ok"]


def _caller_graph_inplace(rank: int, world: int) -> str:
    torch.manual_seed(0)
    mods = [InplaceHead(), nn.Linear(D, D)]
    ref = copy.deepcopy(mods)
    x0, y = torch.randn(8, D), torch.randn(8, D)
    scale, ref_scale = torch.tensor(1.5, requires_grad=True), torch.tensor(1.5, requires_grad=True)
    F.mse_loss(ref[1](ref[0](x0 * ref_scale)), y).backward()   # the whole batch: the mean of 4 equal means
    sched = pp.ScheduleGPipe(pp.PipelineStage(mods[rank], rank, world, "cpu"), 4, loss_fn=F.mse_loss)
    sched.step(*((x0 * scale,) if rank == 0 else ()), target=y if rank == 1 else None)
    _check_grads(mods[rank], ref[rank])
    if rank == 0:
        torch.testing.assert_close(scale.grad, ref_scale.grad)
    return "ok"


def _v_last_stage_keyword(rank: int, world: int) -> str:
    """ZB-V: rank 0 holds the first stage (forward(x)) and the last (forward(x, mask=None)); mask= reaches
    the last stage only (the first was given it too and failed mid-step)."""
    torch.manual_seed(0)
    mods = [nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D), Masked()]
    ref = copy.deepcopy(mods)
    x, y, mask = torch.randn(8, D), torch.randn(8, D), (torch.rand(8, D) > 0.5).float()
    for xc, mc, yc in zip(x.tensor_split(4), mask.tensor_split(4), y.tensor_split(4)):
        (F.mse_loss(ref[3](ref[2](ref[1](ref[0](xc))), mask=mc), yc) / 4).backward()
    mine = [0, 3] if rank == 0 else [1, 2]
    stages = [pp.PipelineStage(mods[s], s, 4, "cpu") for s in mine]
    pp.ScheduleZBVZeroBubble(stages, 4, loss_fn=F.mse_loss).step(
        *((x,) if rank == 0 else ()), mask=mask, target=y if rank == 0 else None)
    for s in mine:
        _check_grads(mods[s], ref[s])
    return "ok"


def test_a_keyword_for_the_last_stage_of_a_v_schedule_skips_the_first():
    assert run_ranks(_v_last_stage_keyword, 2) == ["ok", "ok"]


def test_a_flattened_keyword_of_a_batch_split_along_dim_1_is_refused():
    """(T*B, D) rows of a seq-first batch interleave the samples: no cut along dim 0 follows the batch."""
    from pp.schedules.split_batch import split_batch

    T, B = 3, 4
    with pytest.raises(ValueError, match=r"kwargs\['tok'\] has 12 rows along dim 0, 3 per sample.*split along dim 1"):
        split_batch((torch.randn(T, B, 2),), {"tok": torch.randn(T * B, 2)}, 2, (TensorChunkSpec(1),))
