"""A rank whose step fails mid-way (a bad input found after the first step) does not leave the other
ranks waiting: they stop within seconds with a line naming the rank that failed (issue 15 item 8)."""
from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F

import pp
from pp.testing import run_ranks
from runtime_models import DeepMLP, manual_stage_module, reference


def _bad_input_after_first_step(rank: int, world: int, traced: bool, bad: str) -> tuple:
    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    if traced:
        pipe = pp.pipeline(model, (x[:2],), split_policy=pp.split_into_equal_size(world))
        stage = pipe.build_stage(rank, "cpu")
    else:
        stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, "cpu")
    sched = pp.Schedule1F1B(stage, 4, loss_fn=F.mse_loss)
    first, last = rank == 0, rank == world - 1
    losses: list = []
    sched.step(*((x,) if first else ()), target=y if last else None, losses=losses)
    if last:  # the first step is right
        torch.testing.assert_close(torch.stack(losses), reference(model, x, y, 4)[0])
    wrong = torch.randn(8, 5) if bad == "shape" else x.double()
    start = time.monotonic()
    try:
        sched.step(*((wrong,) if first else ()), target=y if last else None)
    except Exception as e:  # noqa: BLE001 - which error each rank raised is the result
        result = type(e).__name__, str(e), time.monotonic() - start
    else:
        return "no error", "", time.monotonic() - start
    # Every rank caught its error and goes on with a good batch (a "skip the bad batch" loop): the failed
    # step's receives may still be pending and would take this step's messages (a hang, or gloo's
    # size-mismatch abort, before): every rank refuses at once instead
    try:
        sched.step(*((x,) if first else ()), target=y if last else None)
    except RuntimeError as e:
        return (*result, str(e))
    return (*result, "no error")


@pytest.mark.parametrize("traced,bad", [(False, "shape"), (True, "dtype")], ids=["manual-shape", "traced-dtype"])
def test_a_rank_failing_mid_step_stops_the_others_promptly(traced, bad):
    results = run_ranks(_bad_input_after_first_step, 2, traced, bad, timeout_s=120)
    failed = [r for r, (kind, *_) in enumerate(results) if kind not in ("PipelineAborted", "no error")]
    assert len(failed) >= 1, results
    for rank, (kind, message, seconds, _) in enumerate(results):
        assert kind != "no error", results
        if rank not in failed:
            assert kind == "PipelineAborted", results
            assert f"rank {failed[0]} failed with" in message and "stopped waiting in" in message, message
        assert seconds < 30, results  # the process group's timeout is 120 s
    for kind, _, _, after in results:
        if traced:   # the traced stage's input check refused the batch before any rank started the step
            assert after == "no error", results
        else:        # a forward failed mid-step
            assert after.startswith("this pipeline cannot run another step: an earlier step failed mid-way on "
                                    f"rank {failed[0]}"), results


def _disagreeing_ranks(rank: int, world: int) -> list[str]:
    """Ranks that build other schedules or call other methods: once each waited on the other forever."""
    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, "cpu")
    first, last = rank == 0, rank == world - 1
    cases = {"step-vs-eval": (pp.Schedule1F1B, 4, "step" if first else "eval"),
             "gpipe-vs-1f1b": (pp.ScheduleGPipe if first else pp.Schedule1F1B, 4, "step"),
             "microbatches": (pp.Schedule1F1B, 2 if first else 4, "step")}
    out = []
    for case, (cls, n_mb, method) in cases.items():
        sched = cls(stage, n_mb, loss_fn=F.mse_loss)
        try:
            getattr(sched, method)(*((x,) if first else ()), target=y if last else None)
        except ValueError as e:
            out.append(str(e))
        else:
            out.append(f"{case}: no error")
    return out


def test_ranks_that_disagree_on_the_schedule_or_method_are_refused_on_every_rank():
    for messages in run_ranks(_disagreeing_ranks, 2, timeout_s=60):
        for m in messages:
            assert m.startswith("the ranks disagree on the pipeline") and "rank 0 calls" in m and "rank 1 calls" in m, m
        assert "rank 0 calls step of" in messages[0] and "rank 1 calls eval of" in messages[0], messages[0]
        assert "rank 0 calls step of ScheduleGPipe" in messages[1] and "rank 1 calls step of Schedule1F1B" in messages[1]
        assert "with 2 microbatches" in messages[2] and "with 4 microbatches" in messages[2]
