"""Multi-rank runtime tests on gloo: every schedule, traced and manual stages, equals the unsplit model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pp
from pp.schedules.registry import SCHEDULES
from pp.testing import run_ranks

from runtime_models import (DeepMLP, SkipShared, manual_stage_module, reference,
                            run_schedule_against_reference)

ALL = list(SCHEDULES)


def _every_schedule(rank, world, traced):
    # One spawn runs all schedules: starting ranks costs more than the steps themselves.
    return [run_schedule_against_reference(rank, world, name, 4, traced) for name in ALL]


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_every_schedule_traced_stages_match_unsplit_model(world):
    assert run_ranks(_every_schedule, world, True, timeout_s=240)[0] == ALL


@pytest.mark.parametrize("world", [2, 4])
def test_every_schedule_manual_stages_match_unsplit_model(world):
    assert run_ranks(_every_schedule, world, False, timeout_s=240)[0] == ALL


def _microbatch_counts(rank, world):
    out = []
    for name in ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV"):
        for n_mb in (1, 2, 8):
            out.append(run_schedule_against_reference(rank, world, name, n_mb, True, steps=1))
    return out


def test_schedules_with_few_and_many_microbatches_match():
    run_ranks(_microbatch_counts, 2, timeout_s=240)


def _skip_and_shared(rank, world, name):
    torch.manual_seed(0)
    model = SkipShared()
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    want_losses, want_grads = reference(model, x, y, 3)
    pipe = pp.pipeline(model, (x[:2],))
    assert pipe.num_stages == 4
    assert pipe.info().stage_io[2].producers == [0, 1]  # the skip from stage 0 arrives directly
    assert pipe.info().shared_params == {"shared": [0, 1]}
    stage = pipe.build_stage(rank, "cpu")
    sched = pp.Schedule1F1B(stage, 3, loss_fn=F.mse_loss) if name == "1F1B" else pp.ScheduleGPipe(
        stage, 3, loss_fn=F.mse_loss)
    losses = []
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == 3 else None, losses=losses)
    for n, p in stage.submod.named_parameters():
        # after step() every copy of the shared parameter holds the full gradient
        torch.testing.assert_close(p.grad, want_grads[n], msg=lambda m: f"{n}: {m}")
    if rank == 3:
        torch.testing.assert_close(torch.stack(losses), want_losses)
    return True


@pytest.mark.parametrize("name", ["1F1B", pytest.param("GPipe", marks=pytest.mark.slow)])
def test_skip_connection_and_shared_parameter_on_four_ranks(name):
    assert all(run_ranks(_skip_and_shared, 4, name, timeout_s=120))


def _forward_only(rank, world):
    torch.manual_seed(0)
    model = DeepMLP()
    x = torch.randn(8, 4)
    want = copy.deepcopy(model)(x)
    pipe = pp.pipeline(model, (x[:2],), split_policy=pp.split_into_equal_size(2))
    stage = pipe.build_stage(rank, "cpu")
    results = []
    sched = pp.ScheduleGPipe(stage, 4)  # no loss_fn: step() is forward-only
    results.append(sched.step(*((x,) if rank == 0 else ())))
    sched = pp.Schedule1F1B(stage, 4, loss_fn=F.mse_loss)
    results.append(sched.eval(*((x,) if rank == 0 else ())))
    if rank == 1:
        for got in results:
            torch.testing.assert_close(got, want)
        assert all(p.grad is None for p in stage.submod.parameters())
    else:
        assert results == [None, None]
    return True


def test_forward_only_step_and_eval_return_merged_output_on_last_rank():
    assert all(run_ranks(_forward_only, 2, timeout_s=120))


def _shape_change(rank, world):
    """A new batch size re-sends the metadata; the results stay exact."""
    torch.manual_seed(0)
    model = DeepMLP()
    pipe_model = copy.deepcopy(model)
    stage = pp.PipelineStage(manual_stage_module(pipe_model, rank, 2), rank, 2, "cpu")
    sched = pp.Schedule1F1B(stage, 2, loss_fn=F.mse_loss)
    for batch in (8, 8, 4, 6):
        x, y = torch.randn(batch, 4), torch.randn(batch, 3)
        stage.submod.zero_grad()
        losses = []
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None, losses=losses)
        want_losses, _ = reference(model, x, y, 2)
        if rank == 1:
            torch.testing.assert_close(torch.stack(losses), want_losses)
    return True


def test_changing_batch_shape_between_steps_stays_exact():
    assert all(run_ranks(_shape_change, 2, timeout_s=120))


def _bad_inputs(rank, world):
    torch.manual_seed(0)
    stage = pp.PipelineStage(manual_stage_module(DeepMLP(), rank, 2), rank, 2, "cpu")
    sched = pp.Schedule1F1B(stage, 4, loss_fn=F.mse_loss)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    messages = []
    cases = [
        dict(x=x, y=None),               # the last rank forgot the target
        dict(x=torch.randn(3, 4), y=y),  # batch of 3 cannot make 4 microbatches
        dict(x=None, y=y),               # the first rank passed no batch
    ]
    for case in cases:
        try:
            sched.step(*((case["x"],) if rank == 0 and case["x"] is not None else ()),
                       target=case["y"] if rank == 1 else None, losses=[])
            messages.append("no error")
        except Exception as e:  # each rank reports what it saw
            messages.append(f"{type(e).__name__}: {e}")
    # after the failures the schedule still works
    losses = []
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None, losses=losses)
    return messages


def test_bad_inputs_fail_on_the_rank_that_made_them_and_no_rank_hangs():
    r0, r1 = run_ranks(_bad_inputs, 2, timeout_s=120)
    # missing target: the last rank says why, the first rank is told who failed
    assert "target" in r1[0] and r1[0].startswith("ValueError")
    assert "rank 1" in r0[0]
    # batch too small: the first rank names both numbers
    assert r0[1].startswith("ValueError") and "3" in r0[1] and "4" in r0[1]
    assert "rank 0" in r1[1]
    # no batch on the first rank
    assert r0[2].startswith("ValueError") and "first stage" in r0[2]
    assert "rank 0" in r1[2]


def _construction_errors(rank, world):
    stage = pp.PipelineStage(manual_stage_module(DeepMLP(), rank, 2), rank, 2, "cpu")
    # one stage per rank runs (as torch's); 3 stages on 2 ranks do not divide
    third = pp.PipelineStage(manual_stage_module(DeepMLP(), rank, 3), rank, 3, "cpu")
    errors = []
    for make in (lambda: pp.Schedule1F1B(stage, 0), lambda: pp.ScheduleInterleaved1F1B([third], 4),
                 lambda: pp.ScheduleGPipe([stage, stage], 4)):
        try:
            make()
            errors.append(None)
        except (ValueError, TypeError) as e:
            errors.append(str(e))
    return errors


def test_schedule_construction_errors_are_clear():
    errors = run_ranks(_construction_errors, 2, timeout_s=60)[0]
    assert "n_microbatches" in errors[0] and "0" in errors[0]
    assert "Interleaved1F1B" in errors[1] and "num_stages=3" in errors[1]
    assert errors[2] is not None and "one PipelineStage" in errors[2]


def _user_actions(rank, world):
    torch.manual_seed(0)
    model = DeepMLP()
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    want_losses, want_grads = reference(model, x, y, 2)
    pipe = pp.pipeline(model, (x[:4],), split_policy=pp.split_into_equal_size(2))
    stage = pipe.build_stage(rank, "cpu")
    # a hand-written GPipe-like order with compute actions only: pp adds the sends and receives
    lists = {0: ["0F0", "0F1", "0B0", "0B1"], 1: ["1F0", "1F1", "1B1", "1B0"]}
    sched = pp.schedule_from_actions(stage, 2, lists, loss_fn=F.mse_loss)
    losses = []
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None, losses=losses)
    for n, p in stage.submod.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n])
    if rank == 1:
        torch.testing.assert_close(torch.stack(losses), want_losses)
    return True


def test_schedule_from_user_written_action_strings():
    assert all(run_ranks(_user_actions, 2, timeout_s=120))


def _recorded_trace(rank, world, path):
    torch.manual_seed(0)
    stage = pp.PipelineStage(manual_stage_module(DeepMLP(), rank, 2), rank, 2, "cpu")
    sched = pp.Schedule1F1B(stage, 4, loss_fn=F.mse_loss)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    sched.record_trace = True
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None, losses=[])
    return sched.trace_events()


def test_recorded_trace_of_a_real_run_draws_as_a_timeline(tmp_path):
    import json
    import subprocess
    import sys

    events = [e for per_rank in run_ranks(_recorded_trace, 2, str(tmp_path), timeout_s=60) for e in per_rank]
    names = sorted(e["name"] for e in events)
    assert names == sorted([f"{s}{k}{m}" for s in (0, 1) for k in "FB" for m in range(4)])
    assert all(e["dur"] >= 0 and e["pid"] in (0, 1) for e in events)
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    out = subprocess.run([sys.executable, "-m", "pp.schedules.show", "1F1B", "--trace", str(trace),
                          "-o", str(tmp_path / "t.png")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bubble=" in out.stdout and (tmp_path / "t.png").stat().st_size > 1000
