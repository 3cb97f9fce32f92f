"""torch's per-microbatch stage methods (forward_one_chunk, backward_one_chunk, backward_weight_one_chunk)
on pp's PipelineStage: pp's executor runs every F, B/I and W through them, so a subclass overriding them
(torch users wrap them to change inputs, add dependencies, log) runs under every schedule. Numbers are
checked against the unsplit model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import pp
from pp.schedules.classes import schedule_class
from pp.schedules.registry import get_spec
from pp.testing import run_ranks
from runtime_models import DeepMLP, _manual_name, manual_stage_module


class ChunkSpy(pp.PipelineStage):
    """Doubles the first stage's microbatch inputs, halves the last stage's loss, and records every call
    with its flags: what a torch user's stage subclass does through the chunk methods."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple] = []

    def forward_one_chunk(self, fwd_chunk_id, args=(), kwargs=None, save_forward_output=True):
        self.calls.append(("F", fwd_chunk_id))
        if self.is_first:
            args = tuple(a * 2 for a in args)
        return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        self.calls.append(("B" if full_backward else "I", bwd_chunk_id, last_backward))
        if loss is not None:
            loss = loss * 0.5
        return super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                          last_backward=last_backward)

    def backward_weight_one_chunk(self, bwd_chunk_id, last_backward=False):
        self.calls.append(("W", bwd_chunk_id, last_backward))
        return super().backward_weight_one_chunk(bwd_chunk_id, last_backward=last_backward)


def _overrides_run(rank: int, world: int, name: str) -> str:
    torch.manual_seed(0)
    n_mb = 4
    model = DeepMLP(n_layers=8)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    ref = copy.deepcopy(model)   # the unsplit model on doubled inputs, each microbatch's loss halved
    losses_ref = [F.mse_loss(ref(xc * 2), yc) for xc, yc in zip(x.tensor_split(n_mb), y.tensor_split(n_mb))]
    (sum(losses_ref) * 0.5 / n_mb).backward()
    spec = get_spec(name)
    n_stages = world * (spec.stages_per_rank or 2)
    placement = spec.placement(n_stages, world)
    stages = [ChunkSpy(manual_stage_module(copy.deepcopy(model), s, n_stages), s, n_stages, "cpu")
              for s in range(n_stages) if placement[s] == rank]
    sched = schedule_class(name)(stages[0] if spec.stages_per_rank == 1 else stages, n_mb, loss_fn=F.mse_loss)
    held = {s.stage_index for s in stages}
    for step in range(2):
        for s in stages:
            s.submod.zero_grad()
            s.calls.clear()
        losses: list = []
        sched.step(*((x,) if 0 in held else ()), target=y if n_stages - 1 in held else None, losses=losses)
    per = len(model.layers) // n_stages
    for s in stages:
        for n, p in s.submod.named_parameters():
            torch.testing.assert_close(p.grad, dict(ref.named_parameters())[_manual_name(n, s.stage_index, per)].grad)
        kinds = [c[0] for c in s.calls]
        assert kinds.count("F") == n_mb, s.calls
        backs = [c for c in s.calls if c[0] != "F"]
        # torch's flag: True once per stage and step, on its last backward (the last W under the I/W split)
        assert [c[2] for c in backs] == [False] * (len(backs) - 1) + [True], s.calls
        assert kinds.count("B") + kinds.count("W") == n_mb, s.calls
    if n_stages - 1 in held:   # the schedule's losses: before the subclass halved them
        torch.testing.assert_close(torch.stack(losses), torch.stack(losses_ref).detach())
    return name


@pytest.mark.parametrize("name", ["1F1B", "Interleaved1F1B", "ZBVZeroBubble"])
def test_stage_subclass_overriding_chunk_methods_runs_under_every_schedule(name):
    assert run_ranks(_overrides_run, 2, name) == [name, name]


def _direct_calls(rank: int, world: int) -> str:
    """One rank, one stage: torch's methods called by hand, and their errors."""
    torch.manual_seed(0)
    model = DeepMLP(n_layers=2)
    x, y = torch.randn(4, 4), torch.randn(4, 3)
    stage = pp.PipelineStage(copy.deepcopy(model), 0, 1, "cpu")
    stage.has_backward = True
    out = stage.forward_one_chunk(0, (x,))
    torch.testing.assert_close(out, model(x))
    loss = F.mse_loss(out, y)
    stage.backward_one_chunk(0, loss=loss)
    F.mse_loss(model(x), y).backward()
    for (n, p), q in zip(stage.submod.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    with pytest.raises(RuntimeError, match=r"backward_one_chunk\(0\) without a pending forward of microbatch 0"):
        stage.backward_one_chunk(0, loss=loss)    # backward once per forward
    with pytest.raises(NotImplementedError, match="get_fwd_recv_ops: pp posts a stage's transfers itself"):
        stage.get_fwd_recv_ops(0)
    stage.has_backward = False
    stage.forward_one_chunk(1, (x,))
    assert stage.backward_one_chunk(1) is None    # as torch: no backward in a step that runs none
    return "ok"


def test_chunk_methods_called_by_hand():
    assert run_ranks(_direct_calls, 1) == ["ok"]


def _loss_to_middle_stage(rank: int, world: int) -> str:
    stage = pp.PipelineStage(manual_stage_module(DeepMLP(n_layers=2), rank, world), rank, world, "cpu")
    stage.has_backward = True
    if rank == 0:
        stage.forward_one_chunk(0, (torch.randn(2, 4),))
        with pytest.raises(ValueError, match="stage 0 is not the last stage"):
            stage.backward_one_chunk(0, loss=torch.tensor(1.0, requires_grad=True))
    return "ok"


def test_loss_given_to_a_stage_other_than_the_last_is_refused():
    assert run_ranks(_loss_to_middle_stage, 2) == ["ok", "ok"]


def _step_microbatches_override(rank: int, world: int) -> str:
    class Mine(pp.PipelineScheduleSingle):
        def _step_microbatches(self, arg_mbs=None, kwarg_mbs=None, target_mbs=None, losses=None):
            raise AssertionError("never called")

    stage = pp.PipelineStage(DeepMLP(n_layers=2), 0, 1, "cpu")
    with pytest.raises(NotImplementedError, match="Mine overrides _step_microbatches, which pp never calls"):
        Mine(stage, 2, loss_fn=F.mse_loss)
    return "ok"


def test_a_step_microbatches_override_is_refused_not_ignored():
    assert run_ranks(_step_microbatches_override, 1) == ["ok"]


def _custom_functions_run(rank: int, world: int, name: str, skip_loss: bool) -> str:
    """torch's register_custom_function recipe (the function computes through the chunk methods and
    asks the schedule for the loss), against the unsplit model."""
    from pp.schedules import BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, FULL_BACKWARD

    torch.manual_seed(0)
    n_mb = 4
    model = DeepMLP(n_layers=8)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    ref = copy.deepcopy(model)
    sum(F.mse_loss(ref(xc), yc) for xc, yc in zip(x.tensor_split(n_mb), y.tensor_split(n_mb))).div(n_mb).backward()
    spec = get_spec(name)
    n_stages = world * (spec.stages_per_rank or 2)
    placement = spec.placement(n_stages, world)
    stages = {s: pp.PipelineStage(manual_stage_module(copy.deepcopy(model), s, n_stages), s, n_stages, "cpu")
              for s in range(n_stages) if placement[s] == rank}
    sched = schedule_class(name)(list(stages.values()), n_mb, loss_fn=F.mse_loss) if spec.stages_per_rank != 1 \
        else schedule_class(name)(next(iter(stages.values())), n_mb, loss_fn=F.mse_loss)
    seen: list = []

    def forward(action, ctx):
        assert ctx.schedule_ref is sched and len(ctx.arg_mbs) == n_mb
        stage, mb = stages[action.stage_index], action.microbatch_index
        seen.append(repr(action))
        out = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb])
        if not skip_loss:   # where the function leaves it out, pp computes the loss itself
            ctx.schedule_ref._maybe_compute_loss(stage, out, ctx.target_mbs, mb)

    def backward(action, ctx):
        stage, mb = stages[action.stage_index], action.microbatch_index
        seen.append(repr(action))
        schedule = ctx.schedule_ref
        full = action.computation_type == FULL_BACKWARD
        if full:
            schedule.backward_counter[stage.stage_index] += 1
        stage.backward_one_chunk(mb, loss=schedule._maybe_get_loss(stage, mb), full_backward=full,
                                 last_backward=schedule.backward_counter[stage.stage_index] == schedule._n_microbatches)

    def weight(action, ctx):
        seen.append(repr(action))
        stages[action.stage_index].backward_weight_one_chunk(action.microbatch_index)

    sched.register_custom_function(FORWARD, forward)
    sched.register_custom_function(FULL_BACKWARD, backward)
    sched.register_custom_function(BACKWARD_INPUT, backward)
    sched.register_custom_function(BACKWARD_WEIGHT, weight)
    losses: list = []
    sched.step(*((x,) if 0 in stages else ()), target=y if n_stages - 1 in stages else None, losses=losses)
    per = len(model.layers) // n_stages
    for s, stage in stages.items():
        for n, p in stage.submod.named_parameters():
            torch.testing.assert_close(p.grad, dict(ref.named_parameters())[_manual_name(n, s, per)].grad)
    assert sum(a.endswith(("F0", "F1", "F2", "F3")) and "SEND" not in a for a in seen) == n_mb * len(stages), seen
    assert len(seen) == 3 * n_mb * len(stages) if "ZB" in name else 2 * n_mb * len(stages), seen
    if n_stages - 1 in stages:
        assert len(losses) == n_mb
    return name


@pytest.mark.parametrize("name,skip_loss", [("1F1B", False), ("Interleaved1F1B", True), ("ZBVZeroBubble", False)])
def test_registered_custom_functions_compute_every_action(name, skip_loss):
    assert run_ranks(_custom_functions_run, 2, name, skip_loss) == [name, name]


def _custom_function_that_computes_nothing(rank: int, world: int) -> str:
    from pp.schedules import FULL_BACKWARD

    stage = pp.PipelineStage(manual_stage_module(DeepMLP(n_layers=2), rank, world), rank, world, "cpu")
    sched = pp.Schedule1F1B(stage, 2, loss_fn=F.mse_loss)
    sched.register_custom_function(FULL_BACKWARD, lambda action, ctx: None)
    try:
        sched.step(*((torch.randn(4, 4),) if rank == 0 else ()), target=torch.randn(4, 3) if rank == 1 else None)
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_a_custom_function_that_computes_nothing_fails_the_step_rather_than_train_nothing():
    got = run_ranks(_custom_function_that_computes_nothing, 2)
    assert "the custom function registered for FULL_BACKWARD returned without computing 1B0" in got[1], got
    assert "pipeline step aborted" in got[0] or "rank 1" in got[0], got


def _register_errors(rank: int, world: int) -> str:
    from torch.distributed.pipelining.schedules import FORWARD as TORCH_FORWARD

    from pp.schedules import OVERLAP_F_B, UNSHARD

    sched = pp.ScheduleGPipe(pp.PipelineStage(DeepMLP(n_layers=2), 0, 1, "cpu"), 2, loss_fn=F.mse_loss)
    for kind in (OVERLAP_F_B, UNSHARD):
        with pytest.raises(NotImplementedError, match=f"register_custom_function\\({kind.name}\\)"):
            sched.register_custom_function(kind, lambda a, c: None)
    with pytest.raises(ValueError, match="invalid computation type 'X'"):
        sched.register_custom_function("X", lambda a, c: None)
    with pytest.raises(TypeError, match="must be callable"):
        sched.register_custom_function("F", 3)
    sched.register_custom_function(TORCH_FORWARD, lambda a, c: None)   # torch's own constant
    with pytest.warns(UserWarning, match="FORWARD is already registered"):
        sched.register_custom_function("F", lambda a, c: None)
    with pytest.raises(RuntimeError, match="_maybe_compute_loss is for custom functions"):
        sched._maybe_compute_loss(sched._stages[0], torch.zeros(1), None, 0)
    return "ok"


def test_register_custom_function_refuses_what_it_cannot_run():
    assert run_ranks(_register_errors, 1) == ["ok"]
