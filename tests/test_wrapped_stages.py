"""Data parallelism composed by the user around pp stages, torchtitan-style: each stage module wrapped by
torch DDP or sharded by FSDP2 `fully_shard` over the dp dimension of a (dp 2, pp 2) mesh on 4 gloo
ranks. Every schedule family must give the unsplit model's gradient averaged over the replicas' inputs.

One spawn per wrapper runs all its schedules (starting ranks costs more than the steps).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pp.testing import run_ranks

D, BATCH, N_MB, STEPS = 8, 8, 4, 2
ONE_STAGE = ("GPipe", "1F1B")           # one stage per rank: 2 stages
DDP_SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble",
                 "DualPipeV")
FSDP_SCHEDULES = DDP_SCHEDULES


def _blocks() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, D), nn.Tanh()), nn.Sequential(nn.Linear(D, D), nn.Tanh()),
            nn.Sequential(nn.Linear(D, D), nn.Tanh()), nn.Linear(D, 3)]


def _full_model() -> nn.Sequential:
    return nn.Sequential(OrderedDict((str(i), b) for i, b in enumerate(_blocks())))


def _part(stage: int, n_stages: int) -> nn.Sequential:
    """Stage `stage` of `n_stages` cut by hand; parameter names are the full model's ("1.0.weight")."""
    per = 4 // n_stages
    blocks = _blocks()
    return nn.Sequential(OrderedDict((str(i), blocks[i]) for i in range(stage * per, (stage + 1) * per)))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each replica's own batch for `step`: (2, BATCH, 4) inputs and (2, BATCH, 3) targets."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(2, BATCH, 4, generator=g), torch.randn(2, BATCH, 3, generator=g)


def _reference(step: int) -> dict[str, torch.Tensor]:
    """The unsplit model's gradient at `step`, averaged over the two replicas' batches (mean-MSE loss:
    the mean over microbatches of each microbatch's loss is the loss of the whole batch)."""
    model = _full_model()
    x, y = _data(step)
    loss = sum(F.mse_loss(model(x[d]), y[d]) for d in range(2)) / 2
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))


def _stages_of(name: str, pp_rank: int) -> tuple[int, list[int]]:
    from pp.schedules.registry import get_spec

    n_stages = 2 if name in ONE_STAGE else 4
    placement = get_spec(name).placement(n_stages, 2)
    return n_stages, [s for s, r in enumerate(placement) if r == pp_rank]


def _run_pp(name: str, mesh, wrap) -> list[dict[str, torch.Tensor]]:
    """STEPS steps of schedule `name` over this rank's wrapped stages; each step's full gradients by name."""
    import pp
    from pp.schedules.classes import schedule_class

    dp, pp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("pp")
    n_stages, mine = _stages_of(name, pp_rank)
    modules = {s: wrap(_part(s, n_stages)) for s in mine}
    stages = [pp.PipelineStage(modules[s], s, n_stages, "cpu", group=mesh.get_group("pp")) for s in mine]
    cls = schedule_class(name)
    sched = cls(stages[0] if name in ONE_STAGE else stages, N_MB, loss_fn=F.mse_loss)
    out = []
    for step in range(STEPS):
        for m in modules.values():
            m.zero_grad(set_to_none=True)
        x, y = _data(step)
        sched.step(*((x[dp],) if 0 in mine else ()), target=y[dp] if n_stages - 1 in mine else None)
        out.append(_grads(modules.values()))
    return out


def _grads(modules) -> dict[str, torch.Tensor]:
    got = {}
    for m in modules:
        for n, p in m.named_parameters():
            g = p.grad
            if g is not None and hasattr(g, "full_tensor"):   # FSDP2: a sharded DTensor
                g = g.full_tensor()
            got[n.removeprefix("module.")] = None if g is None else g.detach().clone()
    return got


def _check(name: str, got_steps: list[dict]) -> None:
    for step, got in enumerate(got_steps):
        want = _reference(step)
        for n, g in got.items():
            assert g is not None, f"{name} step {step}: {n} has no gradient"
            torch.testing.assert_close(g, want[n], msg=lambda m: f"{name} step {step}, {n}: {m}")


def _ddp_every_schedule(rank: int, world: int, names: tuple) -> list[str]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    warnings.simplefilter("ignore")
    mesh = _mesh()
    dp_group = mesh.get_group("dp")
    for name in names:
        _check(name, _run_pp(name, mesh, lambda part: DDP(part, process_group=dp_group)))
    return list(names)


def _fsdp_every_schedule(rank: int, world: int, names: tuple) -> list[str]:
    from torch.distributed.fsdp import fully_shard

    warnings.simplefilter("ignore")
    mesh = _mesh()

    def shard(part: nn.Module) -> nn.Module:
        for block in part:        # nested: each block its own FSDP unit, then the stage module
            fully_shard(block, mesh=mesh["dp"])
        return fully_shard(part, mesh=mesh["dp"])

    for name in names:
        _check(name, _run_pp(name, mesh, shard))
    return list(names)


def test_ddp_wrapped_stages_match_unsplit_model_averaged_over_replicas_every_schedule():
    assert run_ranks(_ddp_every_schedule, 4, DDP_SCHEDULES, timeout_s=240)[0] == list(DDP_SCHEDULES)


def test_fsdp2_sharded_stages_match_unsplit_model_averaged_over_replicas_every_schedule():
    assert run_ranks(_fsdp_every_schedule, 4, FSDP_SCHEDULES, timeout_s=240)[0] == list(FSDP_SCHEDULES)
