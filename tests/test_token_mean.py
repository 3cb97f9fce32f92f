"""A mean over the targets that are not ignored (-100: padding, prompt tokens in fine-tuning), spread
unevenly over the microbatches, trains as the unsplit model does: each microbatch's loss gradient is
weighted by its share of the counted targets, not by 1 / n_microbatches (a mean of microbatch means,
silently wrong: the fault transformers#34191 mended in Hugging Face's trainers, and torch's schedules
have). The right values come from the unsplit model on the whole batch."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pp.launcher.models import GPT
from pp.microbatch import loss_class_weights, loss_ignore_index, target_counts
from pp.schedules.registry import get_spec
from pp.testing import run_ranks
from pipes import fresh_pipe

MODEL = dict(vocab_size=32, d_model=16, n_layers=4, n_heads=2, seq_len=8)
PAD = 0


def _batch(rows: int = 8, ignore: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 32, (rows, 8), generator=g)
    y = torch.randint(1, 32, (rows, 8), generator=g)
    y[0, 1:] = ignore        # the first microbatches hold far fewer counted tokens than the last
    y[1, 3:] = ignore
    y[2, :6] = ignore
    return x, y


def mean_ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Cross-entropy as users write it for a causal LM: a plain function, torch's default mean over the
    targets that are not -100."""
    return F.cross_entropy(out.flatten(0, 1), t.flatten())


def row_mean_ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A mean over rows of each row's token mean (a sequence-level loss): it states ignore_index None,
    so microbatches are weighted by rows, which is right for it, not by counted tokens."""
    per_token = F.cross_entropy(out.flatten(0, 1), t.flatten(), reduction="none").view(t.shape)
    counted = (t != -100).sum(1).clamp_min(1)
    return (per_token.sum(1) / counted).mean()


row_mean_ce.ignore_index = None


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(**MODEL)


def _pipe(x: torch.Tensor, n_stages: int = 2):
    """The model cut into `n_stages`, traced once per stage count in a rank (tracing dominates these runs)."""
    return fresh_pipe("gpt", _model, (x[:2],), n_stages)


def _unsplit(loss_fn, x, y) -> tuple[float, dict]:
    model = _model()
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _train(rank: int, world: int, schedule: str, loss: str, dp: int, rows: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    ignore = PAD if loss == "module_pad" else -100
    x, y = _batch(rows, ignore)
    loss_fn = {"plain": mean_ce, "module_pad": nn.CrossEntropyLoss(ignore_index=PAD),
               "partial": functools.partial(F.cross_entropy, reduction="mean"), "rows": row_mean_ce}[loss]
    if loss not in ("plain", "rows"):
        def loss_fn(out, t, _f=loss_fn):   # the module / partial on the flattened logits
            return _f(out.flatten(0, 1), t.flatten())
        loss_fn.ignore_index = ignore
    n_stages = get_spec(schedule).n_stages(world // dp)
    par = pp.parallelize(_pipe(x, n_stages), (x[:rows // dp // 4],), n_microbatches=4, loss_fn=loss_fn,
                         schedule=schedule, dp=dp)
    share = slice(par.dp_rank * rows // dp, (par.dp_rank + 1) * rows // dp)
    par.step(x[share], target=y[share])
    return {n: p.grad for n, p in par.named_parameters() if par.dp_rank == 0}


SCHEDULES = ["1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV"]


def _two_rank_cases(rank: int, world: int) -> dict:
    """Every 2-rank case of this file in one run (a run costs a fork and a trace per stage count)."""
    out = {("plain", s): _train(rank, world, s, "plain", 1, 8) for s in SCHEDULES}
    out["rows"] = _train(rank, world, "1F1B", "rows", 1, 8)
    out["class weights"] = _class_weighted(rank, world)
    out["dict", "bool"] = _dict_target(rank, world, "bool")
    out["dict", "int64"] = _dict_target(rank, world, "int64")
    out["all ignored"] = _all_ignored(rank, world)
    return out


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_two_rank_cases, 2, timeout_s=300)


def _merged(two_ranks: list[dict], case) -> dict:
    """A case's gradients, each from the rank holding it."""
    return {k: v for r in two_ranks for k, v in r[case].items()}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ignored_targets_spread_unevenly_give_the_unsplit_gradient(two_ranks, schedule):
    got = _merged(two_ranks, ("plain", schedule))
    x, y = _batch()
    _, want = _unsplit(mean_ce, x, y)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_a_stated_ignore_index_and_data_parallel_replicas_count_the_global_batch():
    """pp 2 x dp 2: the token count spans both replicas (their gradients are averaged), and a loss that
    states its ignore_index (a padding id, not -100) is counted by it."""
    got = {k: v for r in run_ranks(_train, 4, "1F1B", "module_pad", 2, 16, timeout_s=300) for k, v in r.items()}
    x, y = _batch(16, PAD)
    _, want = _unsplit(lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten(), ignore_index=PAD), x, y)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_a_loss_stating_ignore_index_none_is_weighted_by_rows(two_ranks):
    got = _merged(two_ranks, "rows")
    x, y = _batch()
    _, want = _unsplit(row_mean_ce, x, y)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _class_weighted(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    weight = torch.linspace(0.2, 3.0, MODEL["vocab_size"])
    ce = nn.CrossEntropyLoss(weight=weight)

    def loss_fn(out, t):
        return ce(out.flatten(0, 1), t.flatten())
    loss_fn.weight = weight    # stated, as the module inside cannot be seen
    par = pp.parallelize(_pipe(x), (x[:2],), n_microbatches=4, loss_fn=loss_fn, schedule="1F1B")
    par.step(x, target=y)
    return {n: p.grad for n, p in par.named_parameters()}


def test_a_class_weighted_mean_is_counted_by_its_weights(two_ranks):
    """nn.CrossEntropyLoss(weight=w) divides by the summed weights of the counted targets: each microbatch
    is weighted by its share of those (by counts alone its gradient was off even on an even split)."""
    got = _merged(two_ranks, "class weights")
    x, y = _batch()
    weight = torch.linspace(0.2, 3.0, MODEL["vocab_size"])
    _, want = _unsplit(lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten(), weight=weight), x, y)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _dict_target(rank: int, world: int, mask_dtype: str) -> dict:
    import pp

    x, y = _batch()
    mask = (y != -100).to(getattr(torch, mask_dtype))

    def loss_fn(out, t):   # the class ids under "labels"; the mask rides along (first, in the dict)
        return F.cross_entropy(out.flatten(0, 1), t["labels"].flatten())
    par = pp.parallelize(_pipe(x), (x[:2],), n_microbatches=4, loss_fn=loss_fn, schedule="1F1B")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        par.step(x, target={"mask": mask, "labels": y})
    return {"grads": {n: p.grad for n, p in par.named_parameters()},
            "warned": [str(w.message) for w in caught if "several integer tensors" in str(w.message)]}


def test_a_dict_target_counts_its_one_integer_tensor_and_warns_where_it_has_several(two_ranks):
    """{"mask": m, "labels": y}: the first tensor used to be counted, so a bool mask fell back to rows and
    an int mask counted every entry (wrong gradients, no word). The class ids are the one integer tensor
    (exact with a bool mask); with two integer tensors which one the loss reads cannot be told: rows, and
    a warning naming both."""
    x, y = _batch()
    _, want = _unsplit(mean_ce, x, y)
    got = [r["dict", "bool"] for r in two_ranks]
    grads = {k: v for r in got for k, v in r["grads"].items()}
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert all(r["warned"] == [] for r in got)
    got = [r["dict", "int64"] for r in two_ranks]
    last = got[-1]["warned"]
    assert len(last) == 1 and "target['mask'], target['labels']" in last[0], last


def test_counts_follow_the_loss_and_skip_targets_that_are_not_class_ids():
    ce = nn.CrossEntropyLoss(ignore_index=3)
    assert loss_ignore_index(ce) == 3
    assert loss_ignore_index(functools.partial(F.cross_entropy, ignore_index=5)) == 5
    assert loss_ignore_index(F.nll_loss) == -100 and loss_ignore_index(lambda o, t: o) == -100
    assert loss_ignore_index(row_mean_ce) is None
    assert loss_ignore_index(functools.partial(F.cross_entropy, ignore_index=None)) is None
    y = torch.tensor([[1, -100, 2], [-100, -100, 4]])
    assert target_counts(list(y.split(1)), -100).tolist() == [2.0, 1.0]
    assert target_counts(list(y.float().split(1)), -100) is None        # regression targets: rows count
    assert target_counts([torch.tensor(1), torch.tensor(2)], -100) is None
    byte = torch.tensor([[156, 3], [156, 156]], dtype=torch.uint8)   # -100 is no uint8 value: nothing ignored
    assert target_counts(list(byte.split(1)), -100).tolist() == [2.0, 2.0]
    assert target_counts([{"mask": m, "y": t} for m, t in zip(byte.bool().split(1), y.split(1))], -100).tolist() == [2.0, 1.0]
    assert target_counts([(t, t) for t in y.split(1)], -100) is None    # two integer tensors: cannot tell
    big = torch.randint(-1, 5, (8, 6)).masked_fill_(torch.rand(8, 6) < 0.4, -100)
    for parts in (list(big.split(2)), list(big.tensor_split(3))):   # one pass (equal blocks), one per part
        want = [float((p != -100).sum()) for p in parts]
        assert target_counts(parts, -100, whole=big).tolist() == want
        assert target_counts(parts, -100, whole=(big,), weight=torch.ones(5)).tolist() == want
    w = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    assert target_counts(list(y.split(1)), -100, weight=w).tolist() == [3.0, 8.0]   # w[1] + w[2], w[4]
    assert loss_class_weights(nn.CrossEntropyLoss(weight=w)) is not None
    assert loss_class_weights(functools.partial(F.cross_entropy, weight=w)) is w
    assert loss_class_weights(F.cross_entropy) is None

    class Learned(nn.Module):   # a loss module whose own `weight` is a parameter, not class weights
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(5))
    assert loss_class_weights(Learned()) is None


def test_a_microbatch_whose_targets_are_all_ignored_adds_nothing_and_no_nan(two_ranks):
    """A microbatch of padding only: its own mean is 0/0 (a NaN loss, no gradient), its share 0; the
    step's gradient is the unsplit model's, finite (1 / n weighting gave the other three a quarter each)."""
    got = _merged(two_ranks, "all ignored")
    x, y = _batch()
    y[:2] = -100
    _, want = _unsplit(mean_ce, x, y)
    for name, g in want.items():
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-6, msg=name)


def _all_ignored(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    y[:2] = -100
    par = pp.parallelize(_pipe(x), (x[:2],), n_microbatches=4, loss_fn=mean_ce, schedule="1F1B")
    par.step(x, target=y)
    return {n: p.grad for n, p in par.named_parameters()}


def masking_ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Padding masked inside the loss, in place, as many training scripts do."""
    t[t == PAD] = -100
    return mean_ce(out, t)


def noop_mask_ce(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An in-place edit of the target that changes no count (no entry is 31 + 1)."""
    t[t == 32] = -100
    return mean_ce(out, t)


def _masked_in_loss(rank: int, world: int) -> dict:
    """{case: (warning texts of the last stage's rank, gradients)}: padding masked inside loss_fn (counted
    before the loss: warned), masked before step() (the unsplit token mean), an edit changing no count."""
    import pp

    x, y = _batch(8, PAD)
    masked = y.clone()
    masked[masked == PAD] = -100
    out = {}
    cases = (("inside", masking_ce, y), ("before", mean_ce, masked), ("no count", noop_mask_ce, masked))
    for case, loss_fn, target in cases:
        par = pp.parallelize(_pipe(x), (x[:2],), n_microbatches=4, loss_fn=loss_fn, schedule="1F1B")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):   # warned once per schedule
                par.zero_grad()
                par.step(x, target=target.clone())
        out[case] = ([str(w.message) for w in caught if "in place" in str(w.message)],
                     {n: p.grad for n, p in par.named_parameters()})
    return out


def test_a_target_masked_in_place_inside_loss_fn_is_named_where_it_changes_the_token_count():
    """The kind of transformers#34191 pp cannot weigh right: loss_fn decides what counts after pp counted.
    Masked before step(), the gradient is the unsplit model's token mean; masked inside, a warning on the
    last stage's rank names the loss, the microbatch and both counts."""
    ranks = run_ranks(_masked_in_loss, 2, timeout_s=300)
    x, y = _batch(8, PAD)
    _, want = _unsplit(masking_ce, x, y.clone())
    before = {k: v for r in ranks for k, v in r["before"][1].items()}
    for name, g in want.items():
        torch.testing.assert_close(before[name], g, rtol=1e-5, atol=1e-6, msg=name)
    inside = {k: v for r in ranks for k, v in r["inside"][1].items()}
    assert any(not torch.allclose(inside[n], g, rtol=1e-3, atol=1e-5) for n, g in want.items())
    assert ranks[0]["inside"][0] == [] and len(ranks[1]["inside"][0]) == 1, ranks[1]["inside"][0]
    assert "loss_fn 'masking_ce' modified its target in place" in ranks[1]["inside"][0][0]
    assert "microbatch 0: 16 before the loss, 4 after" in ranks[1]["inside"][0][0]
    assert all(r[case][0] == [] for r in ranks for case in ("before", "no count"))
