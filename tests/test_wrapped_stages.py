"""Data parallelism composed by the user around pp stages, torchtitan-style: each stage module wrapped by
torch DDP or sharded by FSDP2 `fully_shard` over the dp dimension of a (dp 2, pp 2) mesh on 4 gloo
ranks. Every schedule family must give the unsplit model's gradient averaged over the replicas' inputs.

One spawn runs every case (starting 4 ranks and importing DDP/FSDP costs far more than the steps); each
test then checks its cases' results.
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
EVERY = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
# wrapper -> schedules run with it (the last three of EVERY split backward into I and W)
CASES = {"ddp": EVERY, "ddp-find-unused": ("GPipe", "ZBVZeroBubble"),
         "fsdp": EVERY, "fsdp-stage-only": ("1F1B", "InterleavedZeroBubble")}
# (wrapper, schedule, steps) also run by torch.distributed.pipelining: the same gradients. Where torch
# is not compared: its DDP stage fails in DDP's reducer at the second step ("rebuilt parameter indices
# size is not same as original model parameters size"), and under InterleavedZeroBubble its FSDP2
# stages' gradients differ from the unsplit model's (torch 2.13).
TORCH_CASES = (("ddp", "Interleaved1F1B", 1), ("ddp", "GPipe", 1), ("fsdp", "Interleaved1F1B", STEPS))


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


def _reference(step: int, replicas: tuple = (0, 1)) -> dict[str, torch.Tensor]:
    """The unsplit model's gradient at `step`, averaged over the replicas' batches (mean-MSE loss: the
    mean over microbatches of each microbatch's loss is the loss of the whole batch)."""
    model = _full_model()
    x, y = _data(step)
    loss = sum(F.mse_loss(model(x[d]), y[d]) for d in replicas) / len(replicas)
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


def _build(name: str, mesh, wrap, lib: str = "pp") -> tuple:
    """This rank's wrapped stage modules {stage: module} and the schedule `name` over them (lib="torch":
    torch.distributed.pipelining's stage and schedule classes), and a function running one step."""
    if lib == "pp":
        import pp as lib_mod
        from pp.schedules.classes import schedule_class
        cls = schedule_class(name)
    else:
        import torch.distributed.pipelining as lib_mod
        cls = getattr(lib_mod, "Schedule" + name)

    dp, pp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("pp")
    n_stages, mine = _stages_of(name, pp_rank)
    modules = {s: wrap(_part(s, n_stages)) for s in mine}
    stages = [lib_mod.PipelineStage(modules[s], s, n_stages, "cpu", group=mesh.get_group("pp")) for s in mine]
    sched = cls(stages[0] if name in ONE_STAGE else stages, N_MB, loss_fn=F.mse_loss)

    def step(i: int) -> None:
        x, y = _data(i)
        sched.step(*((x[dp],) if 0 in mine else ()), target=y[dp] if n_stages - 1 in mine else None)
    return modules, step


def _run_pp(name: str, mesh, wrap, lib: str = "pp", steps: int = STEPS) -> list[dict[str, torch.Tensor]]:
    """`steps` steps of schedule `name` over this rank's wrapped stages; each step's full gradients."""
    modules, step = _build(name, mesh, wrap, lib)
    out = []
    for i in range(steps):
        for m in modules.values():
            m.zero_grad(set_to_none=True)
        step(i)
        out.append(_grads(modules.values()))
    return out


def _ddp_no_sync_accumulates_then_syncs(mesh, wrap) -> None:
    """A step run inside the user's `ddp.no_sync()` keeps this replica's own gradient; the next step
    outside it averages the sum of both steps' gradients, as DDP does."""
    import contextlib

    dp = mesh.get_local_rank("dp")
    modules, step = _build("ZBVZeroBubble", mesh, wrap)
    with contextlib.ExitStack() as stack:
        for m in modules.values():
            stack.enter_context(m.no_sync())
        step(0)
    _check("no_sync", [_grads(modules.values())], [_reference(0, replicas=(dp,))])
    step(1)
    both = [_reference(0), _reference(1)]
    _check("after no_sync", [_grads(modules.values())], [{n: g + both[1][n] for n, g in both[0].items()}])


def _ddp_static_graph_refused(mesh) -> None:
    import pp
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = DDP(_part(0, 2), process_group=mesh.get_group("dp"), static_graph=True)
    with pytest.raises(ValueError, match="static_graph=True"):
        pp.PipelineStage(module, mesh.get_local_rank("pp"), 2, "cpu", group=mesh.get_group("pp"))


def _grads(modules) -> dict[str, torch.Tensor]:
    got = {}
    for m in modules:
        for n, p in m.named_parameters():
            g = p.grad
            if g is not None and hasattr(g, "full_tensor"):   # FSDP2: a sharded DTensor
                g = g.full_tensor()
            got[n.removeprefix("module.")] = None if g is None else g.detach().clone()
    return got


def _check(name: str, got_steps: list[dict], want_steps: list[dict] | None = None) -> None:
    """Each step's gradients equal the reference (the unsplit model's, or `want_steps`); parameters the
    model does not have (an unused extra) must have no gradient."""
    for step, got in enumerate(got_steps):
        want = _reference(step) if want_steps is None else want_steps[step]
        for n, g in got.items():
            if n not in want:
                assert g is None, f"{name} step {step}: the unused {n} got a gradient"
                continue
            assert g is not None, f"{name} step {step}: {n} has no gradient"
            torch.testing.assert_close(g, want[n], msg=lambda m: f"{name} step {step}, {n}: {m}")


def _wrappers(mesh) -> dict:
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    dp_group, dp_mesh = mesh.get_group("dp"), mesh["dp"]

    def with_unused(part: nn.Module) -> nn.Module:
        part.register_parameter("unused", nn.Parameter(torch.ones(2)))   # never read: its gradient stays None
        return DDP(part, process_group=dp_group, find_unused_parameters=True)

    def nested(part: nn.Module) -> nn.Module:
        for block in part:        # each block its own FSDP unit, then the stage module
            fully_shard(block, mesh=dp_mesh)
        return fully_shard(part, mesh=dp_mesh)

    return {"ddp": lambda part: DDP(part, process_group=dp_group), "ddp-find-unused": with_unused,
            "fsdp": nested, "fsdp-stage-only": lambda part: fully_shard(part, mesh=dp_mesh)}


def _every_case(rank: int, world: int) -> dict[str, str]:
    """Every (wrapper, schedule) case, then the comparisons with torch.distributed.pipelining:
    {case: "ok" or the assertion that failed}. A failed check happens after all of a case's
    collectives, so the other ranks go on to the next case."""
    warnings.simplefilter("ignore")
    mesh = _mesh()
    wrappers = _wrappers(mesh)
    results = {}
    for wrapper, names in CASES.items():
        for name in names:
            try:
                _check(name, _run_pp(name, mesh, wrappers[wrapper]))
                results[f"{wrapper} {name}"] = "ok"
            except AssertionError as e:
                results[f"{wrapper} {name}"] = str(e)
    for case, check in (("no_sync (ddp)", lambda: _ddp_no_sync_accumulates_then_syncs(mesh, wrappers["ddp"])),
                        ("static_graph (ddp)", lambda: _ddp_static_graph_refused(mesh))):
        try:
            check()
            results[case] = "ok"
        except AssertionError as e:
            results[case] = str(e)
    for wrapper, name, steps in TORCH_CASES:
        try:
            ours = _run_pp(name, mesh, wrappers[wrapper], steps=steps)
            _check(name, _run_pp(name, mesh, wrappers[wrapper], lib="torch", steps=steps), ours)
            results[f"torch {wrapper} {name}"] = "ok"
        except AssertionError as e:
            results[f"torch {wrapper} {name}"] = str(e)
    return results


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    # One spawn for every case: starting 4 ranks (importing DDP/FSDP) costs far more than the steps.
    return run_ranks(_every_case, 4, timeout_s=300)[0]


@pytest.mark.parametrize("wrapper", ["ddp", "ddp-find-unused"])
def test_ddp_wrapped_stages_match_unsplit_model_averaged_over_replicas(results, wrapper):
    failed = {n: r for n, r in results.items() if n.startswith(wrapper + " ") and r != "ok"}
    assert len([n for n in results if n.startswith(wrapper + " ")]) == len(CASES[wrapper])
    assert not failed, failed


@pytest.mark.parametrize("wrapper", ["fsdp", "fsdp-stage-only"])
def test_fsdp2_sharded_stages_match_unsplit_model_averaged_over_replicas(results, wrapper):
    failed = {n: r for n, r in results.items() if n.startswith(wrapper + " ") and r != "ok"}
    assert len([n for n in results if n.startswith(wrapper + " ")]) == len(CASES[wrapper])
    assert not failed, failed


def test_wrapped_stages_give_torch_pipelinings_gradients_on_the_same_input(results):
    got = {n: r for n, r in results.items() if n.startswith("torch ")}
    assert len(got) == len(TORCH_CASES) and all(r == "ok" for r in got.values()), got


def test_ddp_no_sync_step_keeps_local_gradient_and_next_step_averages_the_sum(results):
    assert results["no_sync (ddp)"] == "ok", results["no_sync (ddp)"]


def test_ddp_static_graph_is_refused_with_a_clear_error(results):
    assert results["static_graph (ddp)"] == "ok", results["static_graph (ddp)"]
