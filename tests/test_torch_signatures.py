"""torch.distributed.pipelining's constructor parameters work on pp as written for torch ("change one
import"): every parameter torch's PipelineStage and schedule classes take, in torch's positional order,
and torch's older PipelineStage order (group, dw_builder after output_args). Runs are checked against the
unsplit model."""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pp
import pp.schedules as pps
from pp.testing import run_ranks
from runtime_models import DeepMLP, manual_stage_module, reference

SCHEDULES = ["PipelineScheduleSingle", "ScheduleGPipe", "Schedule1F1B", "PipelineScheduleMulti",
             "ScheduleInterleaved1F1B", "ScheduleLoopedBFS", "ScheduleInterleavedZeroBubble",
             "ScheduleZBVZeroBubble", "ScheduleDualPipeV"]


def _params(fn) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_constructors_take_torchs_parameters_in_torchs_order(name):
    from torch.distributed.pipelining import schedules as ts

    if not hasattr(ts, name):
        pytest.skip(f"this torch has no {name}")
    theirs, ours = _params(getattr(ts, name).__init__), _params(getattr(pps, name).__init__)
    positional = [p.name for p in ours if p.kind == p.POSITIONAL_OR_KEYWORD]
    for i, p in enumerate(theirs):
        if p.kind == p.POSITIONAL_OR_KEYWORD:
            assert positional[i] == p.name, f"{name}: torch's parameter {i} is {p.name}, pp's {positional[i]}"
        assert p.name in {q.name for q in ours}, f"{name} lacks torch's {p.name}"
        if p.default is not p.empty:
            assert {q.name: q.default for q in ours}[p.name] == p.default, p.name


def test_pipeline_stage_takes_torchs_parameters():
    from torch.distributed.pipelining import PipelineStage

    ours = {p.name for p in _params(pp.PipelineStage.__init__)}
    assert {p.name for p in _params(PipelineStage.__init__)} <= ours


@pytest.mark.parametrize("method", ["forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk",
                                    "get_fwd_recv_ops", "get_fwd_send_ops", "get_bwd_recv_ops", "get_bwd_send_ops"])
def test_stage_chunk_methods_take_torchs_parameters_in_torchs_order(method):
    from torch.distributed.pipelining.stage import _PipelineStageBase

    theirs, ours = _params(getattr(_PipelineStageBase, method)), _params(getattr(pp.PipelineStage, method))
    assert [p.name for p in ours[:len(theirs)]] == [p.name for p in theirs], method
    for p, q in zip(theirs, ours):
        if p.default is not p.empty:
            assert q.default == p.default, (method, p.name)


def test_register_custom_function_takes_torchs_parameters():
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    theirs = _params(_PipelineScheduleRuntime.register_custom_function)
    assert [p.name for p in _params(pps._PipelineScheduleRuntime.register_custom_function)] == [p.name for p in theirs]


def _bfs_positional(rank: int, world: int) -> bool:
    """LoopedBFS with torch's 4th positional parameter (output_merge_spec), the multi-stage keywords,
    and the base class with use_full_backward and _load_csv: losses and gradients as the unsplit model."""
    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    want_losses, want_grads = reference(model, x, y, 4)
    n_stages = 2 * world

    def stages():
        mine = [s for s in range(n_stages) if s % world == rank]
        return [pp.PipelineStage(manual_stage_module(copy.deepcopy(model), s, n_stages), s, n_stages, "cpu")
                for s in mine]

    def run(sched, built):
        losses: list = []
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None, losses=losses)
        if rank == world - 1:
            torch.testing.assert_close(torch.stack(losses), want_losses)
        per = 4 // n_stages
        for st in built:
            for n, p in st.submod.named_parameters():
                parts = n.split(".")
                if parts[0] == "blocks":
                    n = ".".join(["layers", str(st.stage_index * per + int(parts[1]))] + parts[2:])
                torch.testing.assert_close(p.grad, want_grads[n], msg=lambda m: f"{n}: {m}")

    built = stages()
    run(pp.ScheduleLoopedBFS(built, 4, F.mse_loss, None, True, True, True), built)
    built = stages()
    run(pp.ScheduleInterleaved1F1B(built, 4, F.mse_loss, None, None, None, True,
                                   backward_requires_autograd=True, defer_pp_recv=True), built)
    built = stages()
    with pytest.warns(FutureWarning, match="use_full_backward is no longer supported"):
        base = pps.PipelineScheduleMulti(built, 4, loss_fn=F.mse_loss, use_full_backward=True)
    import os
    import tempfile
    path = os.path.join(tempfile.gettempdir(), f"pp_bfs_{os.getpid()}.csv")
    gen = pp.ScheduleLoopedBFS(stages(), 4, loss_fn=F.mse_loss)
    if rank == 0:  # torch's compute-only CSV: one row per rank
        with open(path + ".0", "w") as f:
            for r in range(world):
                f.write(",".join(str(a) for a in gen.pipeline_order[r] if a is not None) + "\n")
        os.replace(path + ".0", path)
    paths = [path]
    dist.broadcast_object_list(paths, src=0)
    base._load_csv(paths[0])
    run(base, built)
    with pytest.raises(TypeError, match="defer_pp_recv must be True or False, got 'yes'"):
        pp.ScheduleInterleaved1F1B(stages(), 4, loss_fn=F.mse_loss, defer_pp_recv="yes")
    # backward_requires_autograd=False does not make pp's backward run without autograd: step() under
    # no_grad is refused as before, on every rank before any transfer
    sched = pp.ScheduleInterleaved1F1B(stages(), 4, loss_fn=F.mse_loss, backward_requires_autograd=False)
    with torch.no_grad(), pytest.raises(RuntimeError):
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == world - 1 else None)
    return True


def test_multi_stage_schedules_take_torchs_keywords_and_order():
    assert run_ranks(_bfs_positional, 2) == [True, True]


def _stage_orders(rank: int, world: int) -> bool:
    """PipelineStage with group given in torch's older positional slot (after output_args) and in its
    newer one (after output_grads, input_grads), with example gradients: the same run as the unsplit."""
    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    want_losses, _ = reference(model, x, y, 4)
    group = dist.new_group(list(range(world)))
    mb = 2
    h_in = torch.randn(mb, 12) if rank else torch.randn(mb, 4)
    h_out = torch.randn(mb, 3) if rank == world - 1 else torch.randn(mb, 12)
    built = {
        "older": pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world,
                                  torch.device("cpu"), h_in, h_out, group, None),
        "newer": pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world,
                                  torch.device("cpu"), h_in, h_out, h_out.clone(), h_in.clone(), group, None, None),
    }
    for name, stage in built.items():
        assert stage.group is group, name
        losses: list = []
        pp.Schedule1F1B(stage, 4, loss_fn=F.mse_loss).step(
            *((x,) if rank == 0 else ()), target=y if rank == world - 1 else None, losses=losses)
        if rank == world - 1:
            torch.testing.assert_close(torch.stack(losses), want_losses, msg=name)
    with pytest.raises(TypeError, match="output_grads must be a tensor or a tuple of tensors"):
        pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, "cpu",
                         output_grads="grads")
    with pytest.raises(TypeError, match="both by position"):
        pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, "cpu",
                         None, None, group, group=group)
    return True


def test_pipeline_stage_takes_torchs_older_and_newer_positional_orders():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_ranks(_stage_orders, 2) == [True, True]


def test_get_schedule_class_names_as_torch():
    assert pps.get_schedule_class("1f1b") is pp.Schedule1F1B
    assert pps.get_schedule_class("ZBVZeroBubble") is pp.ScheduleZBVZeroBubble
    assert pps.get_schedule_class("PipelineScheduleSingle") is pps.PipelineScheduleSingle
    assert pps.get_schedule_class("pipelineschedulemulti") is pps.PipelineScheduleMulti
    for name in ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
                 "DualPipeV"):   # torch's test_get_schedule_class checks the base class as torch names it
        assert issubclass(pps.get_schedule_class(name), pps._PipelineSchedule), name
    with pytest.raises(ValueError, match=r"unknown schedule name 'Foo': expected one of GPipe, 1F1B"):
        pps.get_schedule_class("Foo")


def _runtime_states(rank: int, world: int) -> bool:
    """torch's stage attributes after a step: no forward kept for backward, the last stage's outputs
    per microbatch, and clear_runtime_states(); and a manual first stage's input_args checked before
    any transfer (an int32 batch is refused on every rank, the schedule stays usable)."""
    torch.manual_seed(0)
    model = DeepMLP(n_layers=4)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    example = torch.randn(2, 4) if rank == 0 else torch.randn(2, 12)
    stage = pp.PipelineStage(manual_stage_module(copy.deepcopy(model), rank, world), rank, world, "cpu",
                             input_args=example)
    assert stage.output_chunks == [] and stage.fwd_cache == {}
    sched = pp.ScheduleGPipe(stage, 4, loss_fn=F.mse_loss)
    inputs, target = ((x,) if rank == 0 else ()), (y if rank == world - 1 else None)
    sched.step(*inputs, target=target)
    assert stage.fwd_cache == {}
    assert len(stage.output_chunks) == (4 if rank == world - 1 else 0)
    stage.clear_runtime_states()
    assert stage.output_chunks == []
    if rank == 0:
        with pytest.raises(ValueError, match=r"stage 0 input 0: expected a float32 tensor of shape \(\*, 4\) "
                                             r"\(its input_args\), got an int32 tensor of shape \(2, 4\)"):
            sched.step(x.to(torch.int32), target=target)
    else:
        with pytest.raises(RuntimeError, match="rank 0 refused the step"):
            sched.step(*inputs, target=target)
    sched.step(*inputs, target=target)
    return True


def test_stage_runtime_states_and_manual_input_checks_as_torch():
    assert run_ranks(_runtime_states, 2) == [True, True]
