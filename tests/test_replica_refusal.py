"""A data- or tensor-parallel replica that refuses its batch (a wrong dtype on one replica's loader) stops
every replica, not just its own pipeline: a caller that skips the bad batch and goes on otherwise ran the
other replicas' step alone, whose gradient all-reduce then paired with the refusing replica's *next*
step (gradients of different steps averaged, without a word) and the last step hung. The right gradient
after the skipped batch comes from the unsplit model on the next step's whole batch."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from pp.launcher.models import GPT
from pp.testing import run_ranks
from pipes import fresh_pipe

MODEL = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, seq_len=8)   # 2 blocks: at most 2 stages here


def _lm(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), t.flatten())


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 32, (8, 8), generator=g) for _ in range(2)]


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(**MODEL)


def _train(rank: int, world: int, dp: int, tp: int, bad_replica: int, bad: str = "input") -> dict:
    import pp

    warnings.simplefilter("ignore")
    xs = _batches()
    mb = (xs[0][:8 // dp // 2],)
    # traced once per stage count in a rank (the 2-rank cases, all pp 1, share one trace)
    pipe = fresh_pipe("gpt", _model, mb, world // (dp * tp))
    par = pp.parallelize(pipe, mb, n_microbatches=2, loss_fn=_lm, dp=dp, tp=tp,
                         tp_plan=_model().tp_plan() if tp > 1 else None, schedule="1F1B")
    rows = slice(par.dp_rank * 8 // dp, (par.dp_rank + 1) * 8 // dp)
    said = []
    for step, x in enumerate(xs):
        x = t = x[rows]
        if step == 0 and (par.dp_rank if dp > 1 else par.tp_rank) == bad_replica:
            # this replica's loader went wrong: the caller skips the batch
            x, t = {"input": (x.float(), t), "target-float": (x, t.float()), "target-rows": (x, t[:-2])}[bad]
        try:
            par.step(x, target=t)
        except (ValueError, RuntimeError) as e:
            said.append(str(e))
    grads = {n: par.full_tensor(n, p.grad) for n, p in par.named_parameters()}   # collective over tp
    return {"said": said, "grads": grads if par.dp_rank == 0 and par.tp_rank == 0 else {}}


CASES = [(2, 1, 4, "input"), (1, 2, 2, "input"), (2, 1, 2, "target-float"), (2, 1, 2, "target-rows")]


def _two_rank_cases(rank: int, world: int) -> dict:
    """The 2-rank cases in one run, one after another (each ends with a good step on every rank)."""
    return {case: _train(rank, world, case[0], case[1], 1, case[3]) for case in CASES if case[2] == world}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_two_rank_cases, 2, timeout_s=240)


@pytest.mark.parametrize("dp, tp, world, bad", CASES)
def test_a_replica_refusing_its_batch_stops_every_replica_and_the_next_step_is_right(two_ranks, dp, tp, world, bad):
    """A float or short target on one replica crashed gloo (sizes of different collectives met) or hung."""
    if world == 2:
        got = [r[dp, tp, world, bad] for r in two_ranks]
    else:
        got = run_ranks(_train, world, dp, tp, 1, bad, timeout_s=240)
    assert all(len(r["said"]) == 1 for r in got), [r["said"] for r in got]   # step 0, on every rank
    said = [r["said"][0] for r in got]
    if bad == "input":
        assert any("expected an int64 tensor" in m for m in said)
        assert all("refused the step" in m for m in said if "expected an int64" not in m)
    elif bad == "target-float":
        assert all("the replicas' targets disagree" in m for m in said), said
    else:
        assert all("the target's 2 rows do not follow the batch's 4" in m for m in said), said
    torch.manual_seed(0)
    model = GPT(**MODEL)
    x = _batches()[1]
    _lm(model(x), x).backward()
    grads = {n: g for r in got for n, g in r["grads"].items()}
    assert grads
    for n, g in grads.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[n].grad, rtol=1e-4, atol=1e-5, msg=n)
