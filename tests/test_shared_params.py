"""A parameter that several stages reach under different names (the T5 layout: `shared.weight` on the
encoder's stage, `dec.embed.weight` and a tied `head.weight` on the decoder's) trains as one parameter:
gradients summed over the ranks holding it, the same values after every optimizer step as the unsplit
model, on every schedule, by hand-built stages and through `pp.parallelize`, and in checkpoints."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from pp.schedules.classes import schedule_class
from pp.schedules.registry import SCHEDULES, get_spec
from pp.testing import run_ranks

ALL = list(SCHEDULES)
VOCAB, D, BATCH, SEQ, N_MB, STEPS, LR = 13, 8, 8, 5, 4, 3, 0.5


class Decoder(nn.Module):
    """Reads its own layer before the shared embedding, so a stage's graph meets `dec.lin...` first."""

    def __init__(self, embed: nn.Embedding, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(D, D) for _ in range(n_layers))
        self.embed = embed

    def forward(self, idx, h):
        for i, layer in enumerate(self.layers):
            if i:
                pp.pipe_split()
            h = torch.tanh(layer(h) + self.embed(idx))
        return h


class T5Layout(nn.Module):
    """One embedding reached as `shared.weight` (encoder), `dec.embed.weight` (decoder) and
    `head.weight` (tied output layer); cut into `n_stages` stages, half encoder and half decoder."""

    def __init__(self, n_stages: int):
        super().__init__()
        self.shared = nn.Embedding(VOCAB, D)
        self.enc = nn.ModuleList(nn.Linear(D, D) for _ in range(n_stages // 2))
        self.dec = Decoder(self.shared, n_stages // 2)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, idx):
        h = self.shared(idx)
        for i, layer in enumerate(self.enc):
            if i:
                pp.pipe_split()
            h = torch.tanh(layer(h))
        pp.pipe_split()
        return self.head(self.dec(idx.flip(-1), h))


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _model(n_stages: int) -> T5Layout:
    torch.manual_seed(0)
    return T5Layout(n_stages)


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=g), torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)


def _reference(n_stages: int) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Per step: the microbatch losses, and every named tensor (aliases too) after the SGD step."""
    model = _model(n_stages)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, states = [], []
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        mb = [lm_loss(model(xc), yc) for xc, yc in zip(x.tensor_split(N_MB), y.tensor_split(N_MB))]
        (sum(mb) / N_MB).backward()
        opt.step()
        losses.append(torch.stack(mb).detach())
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return losses, states


def _check_step(where: str, named, want: dict[str, torch.Tensor], losses: list, want_losses) -> None:
    for n, p in named:
        torch.testing.assert_close(p.detach(), want[n], msg=lambda m: f"{where} {n}: {m}")
    if losses:
        torch.testing.assert_close(torch.stack(losses), want_losses, msg=lambda m: f"{where} losses: {m}")


def _train_stages(rank: int, world: int, name: str, pipes: dict[int, pp.Pipe], copies: bool = False) -> None:
    """`pipeline` + `build_stage` + the schedule class, SGD over this rank's parameters, from the
    model's initial values (one traced pipe per stage count, reset before each schedule). `copies`:
    each stage from a deep copy of its module, so two stages of one rank hold two tensors of the
    shared parameter."""
    spec = get_spec(name)
    n_stages = spec.n_stages(world)
    want_losses, want_states = _reference(n_stages)
    pipe = pipes[n_stages]
    assert pipe.info().shared_params == {"shared.weight": sorted({0, n_stages // 2, n_stages - 1})}
    placement = spec.placement(n_stages, world)
    stages = [pp.build_stage(copy.deepcopy(pipe.get_stage_module(s)), s, pipe.info(), "cpu") if copies
              else pipe.build_stage(s, "cpu") for s in range(n_stages) if placement[s] == rank]
    initial = _model(n_stages).state_dict()
    with torch.no_grad():
        for s in stages:
            for n, p in s.submod.named_parameters():
                p.copy_(initial[n])
    sched = schedule_class(name)(stages[0] if spec.stages_per_rank == 1 else stages, N_MB, loss_fn=lm_loss)
    params = list({id(p): p for s in stages for p in s.submod.parameters()}.values())
    opt = torch.optim.SGD(params, lr=LR)
    held = {s.stage_index for s in stages}
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        losses: list = []
        sched.step(*((x,) if 0 in held else ()), target=y if n_stages - 1 in held else None, losses=losses)
        opt.step()
        named = [(n, p) for s in stages for n, p in s.submod.named_parameters(remove_duplicate=False)]
        _check_step(f"{name} step {step}", named, want_states[step], losses, want_losses[step])


def _every_schedule(rank: int, world: int) -> list[str]:
    example = (_data(0)[0][: BATCH // N_MB],)
    pipes = {n: pp.pipeline(_model(n), example) for n in (world, 2 * world)}
    for name in ALL:
        _train_stages(rank, world, name, pipes)
    return ALL


def test_t5_layout_embedding_trains_as_one_parameter_on_every_schedule():
    assert run_ranks(_every_schedule, 2, timeout_s=300)[0] == ALL


MULTI = ["Interleaved1F1B", "ZBVZeroBubble"]   # copies on one rank and across ranks: looped and V placement


def _copied_stages(rank: int, world: int) -> list[str]:
    example = (_data(0)[0][: BATCH // N_MB],)
    pipe = pp.pipeline(_model(2 * world), example)
    for name in MULTI:
        _train_stages(rank, world, name, {2 * world: pipe}, copies=True)
    return MULTI


def _unequal_copies(rank: int, world: int, where: str) -> str:
    """Interleaved1F1B, 4 stages on 2 ranks, copies of `shared.weight` on stages 0, 2 (rank 0) and 3
    (rank 1); one copy made different: on rank 1 (`across`), or stage 2's deep copy on rank 0 (`within`)."""
    pipe = pp.pipeline(_model(4), (_data(0)[0][: BATCH // N_MB],))
    stages = [pp.build_stage(copy.deepcopy(pipe.get_stage_module(s)), s, pipe.info(), "cpu")
              for s in (rank, rank + 2)]
    if (where == "across" and rank == 1) or (where == "within" and rank == 0):
        with torch.no_grad():
            stages[1].submod.get_parameter("shared.weight").add_(0.5)
    sched = schedule_class("Interleaved1F1B")(stages, N_MB, loss_fn=lm_loss)
    x, y = _data(0)
    try:
        sched.step(*((x,) if rank == 0 else ()), target=y if rank == 1 else None)
    except Exception as e:   # every rank must raise (none may wait for the other)
        return str(e)
    return "trained"


def _both_unequal(rank: int, world: int) -> list[str]:
    return [_unequal_copies(rank, world, where) for where in ("across", "within")]


def test_copies_of_a_shared_parameter_that_differ_are_refused_on_every_rank():
    for msgs in run_ranks(_both_unequal, 2, timeout_s=120):
        for msg in msgs:
            assert "'shared.weight'" in msg and "different values" in msg, msg


def test_stages_of_one_rank_built_from_deep_copies_train_the_shared_parameter_as_one():
    """Two stages of one rank holding two tensors of the shared embedding (built from deep-copied
    modules) once trained them apart without a word; their gradients are summed on the rank now."""
    assert MULTI and run_ranks(_copied_stages, 2, timeout_s=300)[0] == MULTI


def _accumulated(rank: int, world: int) -> list[str]:
    """Two steps with no zero_grad between them (torch's and torchtitan's gradient accumulation): the
    shared parameter's gradient is the sum of both steps', as in the unsplit model. Summing every copy's
    whole gradient after each step once counted the first step twice (found in the field)."""
    done = []
    for name, copies in (("1F1B", False), ("Interleaved1F1B", True)):
        spec = get_spec(name)
        n_stages = spec.n_stages(world)
        ref = _model(n_stages)
        for step in range(2):
            x, y = _data(step)
            mb = [lm_loss(ref(xc), yc) for xc, yc in zip(x.tensor_split(N_MB), y.tensor_split(N_MB))]
            (sum(mb) / N_MB).backward()
        want = {n: p.grad for n, p in ref.named_parameters(remove_duplicate=False)}
        pipe = pp.pipeline(_model(n_stages), (_data(0)[0][: BATCH // N_MB],))
        placement = spec.placement(n_stages, world)
        stages = [pp.build_stage(copy.deepcopy(pipe.get_stage_module(s)), s, pipe.info(), "cpu") if copies
                  else pipe.build_stage(s, "cpu") for s in range(n_stages) if placement[s] == rank]
        sched = schedule_class(name)(stages[0] if spec.stages_per_rank == 1 else stages, N_MB, loss_fn=lm_loss)
        held = {s.stage_index for s in stages}
        for step in range(2):
            x, y = _data(step)
            sched.step(*((x,) if 0 in held else ()), target=y if n_stages - 1 in held else None)
        for s in stages:
            for n, p in s.submod.named_parameters(remove_duplicate=False):
                torch.testing.assert_close(p.grad, want[n], msg=lambda m: f"{name} stage {s.stage_index} {n}: {m}")
        done.append(name)
    return done


def test_a_shared_parameter_accumulates_over_steps_as_the_unsplit_model():
    assert run_ranks(_accumulated, 2, timeout_s=300)[0] == ["1F1B", "Interleaved1F1B"]


def _parallelize_and_checkpoint(rank: int, world: int, name: str, root: str) -> list[str]:
    """`pp.parallelize` trains as the unsplit model; its state dict speaks every alias; a state dict
    holding only the first name loads; a checkpoint saved from it loads into the unsplit model."""
    from pp.launcher import checkpoint as ckpt

    n_stages = get_spec(name).n_stages(world)
    want_losses, want_states = _reference(n_stages)
    model = _model(n_stages)
    par = pp.parallelize(model, (_data(0)[0][: BATCH // N_MB],), n_microbatches=N_MB, loss_fn=lm_loss,
                         schedule=name)
    names = [n for n, _ in par.named_parameters()]
    assert "shared.weight" in names and not {"dec.embed.weight", "head.weight"} & set(names)
    opt = torch.optim.SGD(par.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        losses: list = []
        par.step(x, target=y, losses=losses)
        opt.step()
        _check_step(f"parallelize {name} step {step}", par.state_dict().items(), want_states[step], losses,
                    want_losses[step])
    saved = {k: v.clone() for k, v in par.state_dict().items()}
    assert {"shared.weight", "dec.embed.weight", "head.weight"} <= set(saved)
    ckpt.save(root, STEPS, {"model": saved}, {})
    only_first = {k: v for k, v in want_states[0].items() if k not in ("dec.embed.weight", "head.weight")}
    par.load_state_dict(only_first)
    _check_step("load_state_dict", par.state_dict().items(), want_states[0], [], None)
    return names


def _parallelize_cases(rank: int, world: int, names: list[str], root: str) -> list[str]:
    for name in names:
        _parallelize_and_checkpoint(rank, world, name, os.path.join(root, name))
    return names


def test_t5_layout_through_parallelize_and_checkpoint_matches_unsplit(tmp_path):
    names = ["1F1B", "ZBVZeroBubble"]  # one and two stages per rank (there, the tied ends on one rank)
    run_ranks(_parallelize_cases, 2, names, str(tmp_path), timeout_s=300)
    for name in names:
        _, want_states = _reference(get_spec(name).n_stages(2))
        fresh = T5Layout(get_spec(name).n_stages(2))
        pp.load_unsplit(fresh, str(tmp_path / name / f"step-{STEPS}"))
        for k, v in fresh.state_dict().items():
            torch.testing.assert_close(v, want_states[-1][k], msg=lambda m: f"{name} load_unsplit {k}: {m}")


def test_shared_parameter_has_its_first_name_first_on_every_stage():
    model = _model(2)
    pipe = pp.pipeline(model, (_data(0)[0][:2],))
    assert pipe.info().shared_params == {"shared.weight": [0, 1]}
    for s in range(2):
        stage = pipe.get_stage_module(s)
        first = {id(p): n for n, p in stage.named_parameters()}
        assert first[id(model.shared.weight)] == "shared.weight"
        for alias in ("shared.weight", "dec.embed.weight", "head.weight"):
            assert stage.get_parameter(alias) is model.shared.weight


def test_tp_plan_naming_an_alias_of_a_shared_parameter_is_refused():
    from pp.parallel.api import _check_plan

    pipe = pp.pipeline(_model(2), (_data(0)[0][:2],))
    with pytest.raises(ValueError, match=r"tp_plan shards 'head.weight' \(the same tensor as 'shared.weight'\)"):
        _check_plan(pipe, {"head": pp.tp.ColwiseParallel()})



def _frozen_shared(rank: int, world: int) -> dict:
    """A frozen shared parameter (a tied embedding with requires_grad=False) keeps `.grad` None on every
    copy, as in the unsplit model: the step summing the copies' gradients gave each frozen copy zeros,
    so AdamW's weight decay and moments moved it (found replaying a frozen tied Llama embedding)."""
    model = _model(4)
    model.shared.weight.requires_grad_(False)
    par = pp.parallelize(model, (_data(0)[0][: BATCH // N_MB],), n_microbatches=N_MB, loss_fn=lm_loss,
                         schedule="Interleaved1F1B")
    opt = par.build_optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    for step in range(2):
        x, y = _data(step)
        par.zero_grad()
        par.step(x, target=y)
        opt.step()
    return {"grads": [n for n, p in par.named_parameters() if not p.requires_grad and p.grad is not None],
            "state": {k: v.clone() for k, v in par.state_dict().items()}}


def test_a_frozen_shared_parameter_stays_frozen():
    ref = _model(4)
    ref.shared.weight.requires_grad_(False)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        x, y = _data(step)
        opt.zero_grad()
        torch.stack([lm_loss(ref(a), b) for a, b in zip(x.chunk(N_MB), y.chunk(N_MB))]).mean().backward()
        opt.step()
    want = ref.state_dict()
    for got in run_ranks(_frozen_shared, 2, timeout_s=300):
        assert got["grads"] == []
        for name, t in got["state"].items():
            torch.testing.assert_close(t, want[name], msg=name)
