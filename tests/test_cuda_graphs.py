"""CUDA-graph replay of stages: what is refused (on any machine) and, on a GPU, replayed stages against the
unsplit model for the schedules that allow it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pp.schedules.actions import in_flight_peak
from pp.schedules.classes import schedule_class
from pp.schedules.registry import SCHEDULES, build_lists
import pp
from pp.testing import run_ranks

from runtime_models import DeepMLP, build_stages, run_schedule_against_reference

SPLIT_BACKWARD = ["InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]   # replayed as I and W graphs


def test_slots_are_the_most_microbatches_in_flight_per_stage():
    _, lists = build_lists("1F1B", 4, 8)
    assert [in_flight_peak(lists[r], r) for r in range(4)] == [4, 3, 2, 1]
    _, lists = build_lists("GPipe", 2, 6)
    assert [in_flight_peak(lists[r], r) for r in range(2)] == [6, 6]


def _refusals(rank, world):
    out = {}
    x = torch.randn(8, 4)
    for name in ["1F1B", *SPLIT_BACKWARD]:
        torch.manual_seed(0)
        stages, _ = build_stages(DeepMLP(n_layers=8), name, world, rank, x[:2], True, "cpu")
        sched = schedule_class(name)(stages[0] if name == "1F1B" else stages, 4, loss_fn=F.mse_loss)
        try:
            sched.enable_cuda_graphs()
            out[name] = "accepted"
        except ValueError as e:
            out[name] = str(e)
    return out


def test_stages_on_cpu_are_refused_with_the_reason():
    got = run_ranks(_refusals, 2)[0]
    for name, said in got.items():
        assert "CUDA graphs need stages on a CUDA device; stage 0 is on cpu" in said, (name, said)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("traced", [True, False])
@pytest.mark.parametrize("name", SCHEDULES)
def test_replayed_stages_match_the_unsplit_model_on_one_gpu(name, traced):
    run_ranks(run_schedule_against_reference, 1, name, 4, traced, 3, "cuda", True, backend="nccl")


def _parallelize_refusals(rank, world):
    from runtime_models import DeepMLP as Net
    import pp
    from pp.tp import ColwiseParallel

    out = []
    for kwargs in (dict(tp=2, tp_plan={"layers.0": ColwiseParallel()}), dict(), dict(dp=2, zero=3)):
        try:
            pp.parallelize(Net(n_layers=4), (torch.randn(2, 4),), n_microbatches=2, loss_fn=F.mse_loss,
                           cuda_graphs=True, device="cpu", **kwargs)
            out.append("accepted")
        except ValueError as e:
            out.append(str(e))
    return out


def test_parallelize_refuses_cuda_graphs_with_tp_zero_3_and_on_cpu():
    with_tp, on_cpu, zero_3 = run_ranks(_parallelize_refusals, 2)[0]
    assert with_tp.startswith("cuda_graphs=True with tp=2"), with_tp
    assert "stage 0 is on cpu" in on_cpu, on_cpu
    assert zero_3.startswith("cuda_graphs=True with zero=3: ZeRO 3 frees the whole parameters"), zero_3


def _bf16_mixed_replayed_against_eager(rank, world, schedule, ac="none"):
    """pp.parallelize a traced GPT at bf16-mixed, replayed and eager side by side for 3 optimizer steps:
    the same losses and float32 master gradients; steps 2 and 3 replayed entirely."""
    import pp
    from pp.launcher.config import ModelConfig
    from pp.launcher.models import GPT, init_fn
    from pp.launcher.train import lm_loss

    mc = ModelConfig(name="gpt", vocab_size=64, d_model=32, n_layers=4, n_heads=2, seq_len=16)
    runs = {}
    for graphs in (False, True):
        with torch.device("meta"):
            gpt = GPT(mc.vocab_size, mc.d_model, mc.n_layers, mc.n_heads, mc.seq_len)
        par = pp.parallelize(gpt, (torch.zeros(2, 16, dtype=torch.long),), n_microbatches=4, loss_fn=lm_loss,
                             schedule=schedule, device="cuda", precision="bf16-mixed", cuda_graphs=graphs,
                             activation_checkpointing=ac, init_fn=init_fn(mc, 0))
        opt = par.build_optimizer(torch.optim.AdamW, lr=1e-2)
        g = torch.Generator().manual_seed(1)
        losses, grads = [], []
        for _ in range(3):
            tok = torch.randint(0, 64, (8, 17), generator=g).cuda()
            opt.zero_grad(set_to_none=True)
            got: list = []
            par.step(tok[:, :-1], target=tok[:, 1:], losses=got)
            losses.append(torch.stack(got).float().cpu())
            grads.append({n: p.grad.float().cpu() for n, p in par.named_parameters() if p.grad is not None})
            opt.step()
        replays = sum(s.graphs.replays for s in par.stages) if graphs else None
        runs[graphs] = (losses, grads, replays, [p.dtype for _, p in par.named_parameters()])
    return runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("schedule,ac", [("1F1B", "none"), ("ZBVZeroBubble", "none"), ("1F1B", "full"),
                                         ("ZBVZeroBubble", "full"), ("Interleaved1F1B", "selective"),
                                         ("ZBVZeroBubble", "selective")])
def test_bf16_mixed_and_checkpointing_replay_with_the_eager_losses_and_float32_gradients(schedule, ac):
    runs = run_ranks(_bf16_mixed_replayed_against_eager, 1, schedule, ac, backend="nccl")[0]
    (eager_losses, eager_grads, _, _), (losses, grads, replays, dtypes) = runs[False], runs[True]
    assert set(dtypes) == {torch.float32}
    stages = 1 if schedule == "1F1B" else 2
    assert replays == 2 * 4 * stages, replays
    for step in range(3):
        torch.testing.assert_close(losses[step], eager_losses[step], rtol=0, atol=0)
        assert grads[step].keys() == eager_grads[step].keys()
        for n in grads[step]:
            torch.testing.assert_close(grads[step][n], eager_grads[step][n], rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"step {step} {n}: {m}")


class _HostSync(torch.nn.Module):
    """A stage that reads a value on the host mid-forward: it cannot be captured."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        return h * 2 if h.abs().sum().item() > 1e9 else h


def _shapes_eval_and_fallback(rank, world):
    from runtime_models import reference

    torch.manual_seed(0)
    model = DeepMLP(n_layers=4).cuda()
    stages, _ = build_stages(model, "Interleaved1F1B", 1, 0, torch.randn(2, 4, device="cuda"), True, "cuda")
    sched = schedule_class("Interleaved1F1B")(stages, 4, loss_fn=F.mse_loss)
    sched.enable_cuda_graphs()
    replays = []
    # 8 rows: microbatches of 2; 10 rows: 3, 3, 2, 2 (a new shape: eager once, then captured too)
    for rows in (8, 8, None, 10, 10):
        if rows is None:
            out = sched.eval(torch.randn(8, 4, device="cuda"))
            assert out.shape == (8, 3)
            continue
        x, y = torch.randn(rows, 4, device="cuda"), torch.randn(rows, 3, device="cuda")
        for s in stages:
            s.submod.zero_grad()
        losses: list = []
        sched.step(x, target=y, losses=losses)
        want_losses, want_grads = reference(model, x, y, 4)
        torch.testing.assert_close(torch.stack(losses), want_losses)
        for s in stages:
            for n, p in s.submod.named_parameters():
                torch.testing.assert_close(p.grad, want_grads[n], msg=lambda m: f"rows {rows} {n}: {m}")
        replays.append(sum(s.graphs.replays for s in stages))

    return (replays, *_uncapturable(_HostSync))


def _uncapturable(module_cls) -> tuple[list[str], str | None]:
    """Three 1F1B steps of a one-stage `module_cls` under CUDA graphs, each checked against the module run
    by hand: (the CUDA-graph warnings, the stage's disabled_reason)."""
    import warnings

    torch.manual_seed(0)
    model = module_cls().cuda()
    stage = pp.PipelineStage(model, 0, 1, "cuda")
    one = schedule_class("1F1B")(stage, 2, loss_fn=F.mse_loss)
    one.enable_cuda_graphs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model.zero_grad()
            x, y = torch.randn(4, 4, device="cuda"), torch.randn(4, 3, device="cuda")
            one.step(x, target=y)
            ref = module_cls().cuda()
            ref.load_state_dict(model.state_dict())
            sum(F.mse_loss(ref(a), b) for a, b in zip(x.tensor_split(2), y.tensor_split(2))).div(2).backward()
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad, q.grad, msg=n)
    return [str(w.message) for w in caught if "CUDA graph" in str(w.message)], stage.graphs.disabled_reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_new_shapes_eval_and_uncapturable_stages_stay_correct_on_one_gpu():
    replays, said, reason = run_ranks(_shapes_eval_and_fallback, 1, backend="nccl")[0]
    # step 1 eager; step 2 all 8 replayed (4 microbatches x 2 stages); step 4 only the size-2 microbatches
    # (2 x 2 stages); step 5 all 8 again
    assert replays == [0, 8, 12, 20], replays
    assert len(said) == 1 and "stage 0 cannot be captured as a CUDA graph" in said[0], said
    assert reason, reason


def test_shapes_beyond_max_shapes_run_eagerly_with_one_warning():
    from pp.stage.graphs import StageGraphs

    graphs = StageGraphs(torch.nn.Linear(4, 3), 2, 5, torch.device("cpu"), max_shapes=1)
    graphs.active = True
    with pytest.warns(UserWarning, match="stage 5 has seen more than max_shapes=1 input shapes") as caught:
        for rows in (2, 3, 4, 3):   # shape 2 waits for capture; 3 and 4 are over the limit
            assert graphs.forward(0, [torch.randn(rows, 4)]) is None
    assert len([w for w in caught if "max_shapes" in str(w.message)]) == 1
    assert len(graphs._seen) == 1 and graphs.replays == 0


class _DropoutBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.2))
                                          for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _dropout_in_checkpointed_blocks(rank, world):
    import warnings

    from pp.parallel.checkpointing import apply_checkpointing

    torch.manual_seed(0)
    module = _DropoutBlocks().cuda()
    apply_checkpointing(module, "full")
    stage = pp.PipelineStage(module, 0, 1, "cuda")
    sched = schedule_class("1F1B")(stage, 2, loss_fn=F.mse_loss)
    sched.enable_cuda_graphs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            module.zero_grad()
            sched.step(torch.randn(4, 8, device="cuda"), target=torch.randn(4, 8, device="cuda"))
    return stage.graphs.replays, [str(w.message) for w in caught if "CUDA graph" in str(w.message)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropout_inside_checkpointed_blocks_stays_eager_with_one_warning():
    replays, said = run_ranks(_dropout_in_checkpointed_blocks, 1, backend="nccl")[0]
    assert replays == 0
    assert len(said) == 1 and "draws random numbers" in said[0], said


class _Hooked(torch.nn.Module):
    """Halves the gradient reaching its hidden activation with a tensor hook registered in forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        if h.requires_grad:
            h.register_hook(lambda g: g * 0.5)
        return self.b(h)


def _hooked_forward(rank, world):
    return _uncapturable(_Hooked)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_forward_registering_tensor_hooks_stays_eager_under_cuda_graphs():
    """A replay runs no Python, so a hook registered in forward would be lost from every replayed
    microbatch (the hooked weights' gradients silently unhooked): such a stage runs eagerly, warned."""
    said = run_ranks(_hooked_forward, 1, backend="nccl")[0]
    assert len(said) == 1 and "registers tensor hooks" in said[0], said
