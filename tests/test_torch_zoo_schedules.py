"""Schedules written as torch.distributed.pipelining's test zoo writes them: a subclass of
`PipelineScheduleMulti` that assigns `self.pipeline_order` in its constructor (stages placed out of the
round-robin order, bubbles as None, split I/W backwards), or of `_PipelineScheduleRuntime` that assigns
`pipeline_order_with_comms`; with pp's `_Action` names and with torch's own `_Action` objects. Each trains
one step on 2 gloo ranks, twice, and is compared with the unsplit model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F_

import pp
from pp.schedules import (B, F, I, RECV_B, RECV_F, SEND_B, SEND_F, W, PipelineScheduleMulti, _Action,
                          _PipelineScheduleRuntime)
from pp.testing import run_ranks
from runtime_models import DeepMLP, manual_stage_module, reference


class VShaped(PipelineScheduleMulti):
    """Stages 0 and 3 on rank 0, 1 and 2 on rank 1; two microbatches."""
    rank_stages = {0: [0, 3], 1: [1, 2]}
    n_mb = 2

    def __init__(self, stages, n_microbatches, stage_index_to_group_rank, loss_fn=None):
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn,
                         stage_index_to_group_rank=stage_index_to_group_rank)
        a = _Action
        self.pipeline_order = {
            0: [a(0, F, 0), a(0, F, 1), None, None, a(3, F, 0), a(3, B, 0), a(3, F, 1), a(3, B, 1), None, None,
                a(0, B, 0), a(0, B, 1)],
            1: [None, a(1, F, 0), a(2, F, 0), a(1, F, 1), a(2, F, 1), None, None, a(2, B, 0), a(1, B, 0),
                a(2, B, 1), a(1, B, 1), None],
        }


class Unbalanced(PipelineScheduleMulti):
    """Three stages on rank 0 (0, 1, 4), two on rank 1; one microbatch, as action strings."""
    rank_stages = {0: [0, 1, 4], 1: [2, 3]}
    n_mb = 1

    def __init__(self, stages, n_microbatches, stage_index_to_group_rank, loss_fn=None):
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn,
                         stage_index_to_group_rank=stage_index_to_group_rank)
        self.pipeline_order = {0: ["0F0", "1F0", None, None, "4F0", "4B0", None, None, "1B0", "0B0"],
                               1: [None, None, "2F0", "3F0", None, None, "3B0", "2B0", None, None]}


class WithW(PipelineScheduleMulti):
    """Interleaved stages with the backward split into I (input grads) and W (weight grads)."""
    rank_stages = {0: [0, 2], 1: [1, 3]}
    n_mb = 2

    def __init__(self, stages, n_microbatches, loss_fn=None):
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
        self.use_full_backward = False   # torch's zoo sets it; pp has no use for it
        a = _Action
        self.pipeline_order = {
            0: [a(0, F, 0), a(0, F, 1), a(2, F, 0), a(2, F, 1), None, a(2, I, 0), a(2, W, 0), a(0, I, 0),
                a(2, I, 1), a(0, W, 0), a(0, I, 1), a(2, W, 1), a(0, W, 1)],
            1: [None, a(1, F, 0), a(1, F, 1), a(3, F, 0), a(3, I, 0), a(3, F, 1), a(1, I, 0), a(3, I, 1),
                a(3, W, 0), a(1, I, 1), a(1, W, 0), a(3, W, 1), a(1, W, 1)],
        }


class ReorderedB(_PipelineScheduleRuntime):
    """One stage per rank with every transfer written out: both forwards, then both backwards."""
    rank_stages = {0: [0], 1: [1]}
    n_mb = 2

    def __init__(self, stages, n_microbatches, loss_fn=None):
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
        a = _Action
        self.pipeline_order_with_comms = {
            0: [a(0, F, 0), a(0, F, 1), a(0, SEND_F, 0), a(0, SEND_F, 1), a(0, RECV_B, 0), a(0, RECV_B, 1),
                a(0, B, 0), a(0, B, 1)],
            1: [a(1, RECV_F, 0), a(1, RECV_F, 1), a(1, F, 0), a(1, F, 1), a(1, B, 0), a(1, B, 1),
                a(1, SEND_B, 0), a(1, SEND_B, 1)],
        }


VSHAPED = {0: ["0F0", "0F1", None, None, "3F0", "3B0", "3F1", "3B1", None, None, "0B0", "0B1"],
           1: [None, "1F0", "2F0", "1F1", "2F1", None, None, "2B0", "1B0", "2B1", "1B1", None]}


class TorchActions(PipelineScheduleMulti):
    """VShaped's lists built from torch.distributed.pipelining's own `_Action` objects."""
    rank_stages = VShaped.rank_stages
    n_mb = 2

    def __init__(self, stages, n_microbatches, loss_fn=None):
        super().__init__(stages=stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
        from torch.distributed.pipelining.schedules import _Action as TorchAction

        self.pipeline_order = {r: [None if c is None else TorchAction.from_str(c) for c in cells]
                               for r, cells in VSHAPED.items()}


CASES = {"VShaped": VShaped, "Unbalanced": Unbalanced, "WithW": WithW, "ReorderedB": ReorderedB,
         "TorchActions": TorchActions}


def _run(rank: int, world: int) -> dict:
    """Every case, two steps each; per case: (losses equal, gradients equal, pipeline_order as given)."""
    out = {}
    for name, cls in CASES.items():
        placement = {s: r for r, stages in cls.rank_stages.items() for s in stages}
        n_stages, n_mb = len(placement), cls.n_mb
        torch.manual_seed(0)
        model = DeepMLP(n_layers=n_stages)
        x, y = torch.randn(2 * n_mb, 4), torch.randn(2 * n_mb, 3)
        want_losses, want_grads = reference(model, x, y, n_mb)
        mine = cls.rank_stages[rank]
        stages = [pp.PipelineStage(manual_stage_module(copy.deepcopy(model), s, n_stages), s, n_stages, "cpu")
                  for s in mine]
        kwargs = {"stage_index_to_group_rank": placement} if cls in (VShaped, Unbalanced) else {}
        sched = cls(stages, n_mb, loss_fn=F_.mse_loss, **kwargs)
        ok_losses, ok_grads = True, True
        for _ in range(2):
            for s in stages:
                s.submod.zero_grad(set_to_none=True)
            losses: list = []
            sched.step(*((x,) if 0 in mine else ()), target=y if n_stages - 1 in mine else None, losses=losses)
            if n_stages - 1 in mine:
                ok_losses &= torch.allclose(torch.stack(losses), want_losses)
            for s in stages:
                for n, p in s.submod.named_parameters():
                    parts = n.split(".")
                    key = (".".join(["layers", str(s.stage_index + int(parts[1]))] + parts[2:])
                           if parts[0] == "blocks" else n)
                    ok_grads &= torch.allclose(p.grad, want_grads[key], atol=1e-6)
        out[name] = (ok_losses, ok_grads, sched.stage_to_rank == [placement[s] for s in range(n_stages)],
                     [None if c is None else str(c) for c in sched.pipeline_order[rank]])
    return out


@pytest.fixture(scope="module")
def seen() -> list[dict]:
    return run_ranks(_run, 2, timeout_s=150)


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_schedule_trains_as_the_unsplit_model_on_its_placement(seen, name):
    for rank, got in enumerate(seen):
        ok_losses, ok_grads, placed, _ = got[name]
        assert ok_losses and ok_grads and placed, (name, rank, got[name])


def test_pipeline_order_reads_back_as_assigned(seen):
    for rank in (0, 1):
        assert seen[rank]["VShaped"][3] == seen[rank]["TorchActions"][3] == VSHAPED[rank]
    assert seen[1]["Unbalanced"][3] == [None, None, "2F0", "3F0", None, None, "3B0", "2B0", None, None]


def _refusals(rank: int, world: int) -> list[str]:
    stage = pp.PipelineStage(manual_stage_module(DeepMLP(n_layers=2), rank, 2), rank, 2, "cpu")
    errors = []
    for lists, kwargs in (({0: ["0F0", "0B0"], 1: ["1F0", "1B0"]}, {"stage_index_to_group_rank": {0: 1, 1: 0}}),
                          ({0: ["0F0", "0X0"], 1: ["1F0", "1B0"]}, {}),
                          ({0: ["0F0", 3.5], 1: ["1F0", "1B0"]}, {}),
                          (["0F0"], {})):
        sched = PipelineScheduleMulti([stage], 1, loss_fn=F_.mse_loss, **kwargs)
        with pytest.raises(ValueError) as e:
            sched.pipeline_order = lists
        errors.append(str(e.value))
    # a valid assignment, then one that is no schedule (a forward never run backward): refused, and the
    # schedule still runs the valid lists, as before
    torch.manual_seed(0)
    model = DeepMLP(n_layers=2)
    x, y = torch.randn(4, 4), torch.randn(4, 3)
    want_losses, _ = reference(model, x, y, 2)
    stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, 2), rank, 2, "cpu")
    sched = PipelineScheduleMulti([stage], 2, loss_fn=F_.mse_loss)
    sched.pipeline_order = {0: ["0F0", "0F1", None, None, "0B0", "0B1"], 1: [None, "1F0", "1F1", "1B0", "1B1"]}
    with pytest.raises(ValueError) as e:
        sched.pipeline_order = {0: ["0F0", "0F1", "0B0"], 1: ["1F0", "1F1", "1B0", "1B1"]}
    errors.append(str(e.value))
    assert [str(c) for c in sched.pipeline_order[0] if c is not None] == ["0F0", "0F1", "0B0", "0B1"]
    losses: list = []
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None, losses=losses)
    if rank == 1:
        torch.testing.assert_close(torch.stack(losses), want_losses)
    # edited in place, as torch reads the lists at each step: a row swapped is run from the next step on
    sched.pipeline_order[0] = ["0F0", "0F1", None, None, "0B1", "0B0"]
    sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None, losses=losses)
    errors.append(" ".join(str(a) for a in sched.pipeline_order_with_comms[0] if a.is_compute))
    # rows filled one by one (torch's own _load_csv does so) on a schedule with none yet
    fresh = PipelineScheduleMulti([stage], 2, loss_fn=F_.mse_loss)
    for r, cells in {0: ["0F0", "0F1", "0B0", "0B1"], 1: ["1F0", "1F1", "1B0", "1B1"]}.items():
        fresh.pipeline_order[r] = cells
    fresh.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None, losses=losses)
    if rank == 1:
        torch.testing.assert_close(torch.stack(losses), want_losses)
    # torch's zoo calls this after assigning; it gives the placement
    errors.append(str(fresh._validate_and_set_stage_mapping(fresh.pipeline_order)))
    return errors


def test_bad_lists_and_a_placement_they_contradict_are_refused_naming_the_cell():
    errors = run_ranks(_refusals, 2, timeout_s=60)[0]
    assert "pipeline_order: stage_index_to_group_rank={0: 1, 1: 0} does not match" in errors[0], errors[0]
    assert "pipeline_order: rank 0, column 2: cannot read schedule action '0X0'" in errors[1], errors[1]
    assert "column 2" in errors[2] and "3.5" in errors[2], errors[2]
    assert "pipeline_order: expected a dict of rank" in errors[3], errors[3]
    assert "0B1" in errors[4] or "microbatch 1" in errors[4], errors[4]
    assert errors[5] == "0F0 0F1 0B1 0B0", errors[5]
    assert errors[6] == "{0: 0, 1: 1}", errors[6]


def _lifecycle(rank: int, world: int) -> list[str]:
    """What a fresh user found: each refusal on every rank, never a hang."""
    torch.manual_seed(0)
    model = DeepMLP(n_layers=2)
    x, y = torch.randn(4, 4), torch.randn(4, 3)
    order = {0: ["0F0", "0F1", "0B0", "0B1"], 1: ["1F0", "1F1", "1B0", "1B1"]}
    out = []

    def step(sched, **kw):
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None, **kw)

    stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, 2), rank, 2, "cpu")
    for bad in ({0: order[0], 2: order[1]},                                      # a rank outside the group
                {0: order[0], 1: order[1] + ["0F0"]}):                           # stage 0 on two ranks
        with pytest.raises(ValueError) as e:
            PipelineScheduleMulti([stage], 2, loss_fn=F_.mse_loss).pipeline_order = bad
        out.append(str(e.value))
    only_one = PipelineScheduleMulti([stage], 2, loss_fn=F_.mse_loss)   # assigned on rank 0 only
    if rank == 0:
        only_one.pipeline_order = order
    with pytest.raises(ValueError) as e:
        step(only_one)
    out.append(str(e.value))
    calls = []

    def failing(out_, target):   # the loss raises in its second call: the step fails mid-way
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("loss blew up")
        return F_.mse_loss(out_, target)

    sched = PipelineScheduleMulti([stage], 2, loss_fn=failing)
    sched.pipeline_order = order
    with pytest.raises(Exception):
        step(sched)
    sched.pipeline_order = order   # new lists do not make the pending transfers safe
    with pytest.raises(RuntimeError) as e:
        step(sched)
    out.append(str(e.value))
    return out


def test_refusals_reach_every_rank_and_a_failed_step_stays_refused_after_new_lists():
    for got in run_ranks(_lifecycle, 2, timeout_s=90):
        assert "the lists name rank 2, but the pipeline's group has ranks 0..1" in got[0], got[0]
        assert "stage 0 is computed on two ranks: rank 0 and rank 1 (its action 0F0)" in got[1], got[1]
        assert "the ranks disagree on the pipeline" in got[2] and "with no action lists" in got[2], got[2]
        assert "cannot run another step: an earlier step failed mid-way" in got[3], got[3]


def _without_loss_fn(rank: int, world: int) -> list:
    """Backward lists (or a target) given to a schedule with no loss_fn: forward only, said aloud once."""
    import warnings

    torch.manual_seed(0)
    model = DeepMLP(n_layers=2)
    x, y = torch.randn(4, 4), torch.randn(4, 3)
    stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, 2), rank, 2, "cpu")
    out = []
    for written in (True, False):   # lists the user wrote, then a generated schedule
        sched = PipelineScheduleMulti([stage], 2) if written else pp.Schedule1F1B(stage, 2)
        if written:
            sched.pipeline_order = {0: ["0F0", "0F1", "0B0", "0B1"], 1: ["1F0", "1F1", "1B0", "1B1"]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
        out.append([str(w.message) for w in caught if "no loss_fn" in str(w.message)])
        out.append(all(p.grad is None for p in stage.submod.parameters()))
    return out


def test_backward_lists_or_a_target_without_loss_fn_warn_that_no_gradients_are_computed():
    r0, r1 = run_ranks(_without_loss_fn, 2, timeout_s=60)
    for got in (r0, r1):   # the lists' warning on every rank, once for two steps; no gradients anywhere
        assert len(got[0]) == 1 and got[0][0].startswith("the action lists hold backward actions (rank 0's 0B0), "
                                                         "but the schedule has no loss_fn"), got[0]
        assert got[1] and got[3]
    assert r0[2] == [] and len(r1[2]) == 1 and "step() got a target on the rank holding the last stage" in r1[2][0]
