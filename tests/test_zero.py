"""ZeRO over data-parallel replicas: `zero` 1, 2 and 3 at pp 2 x dp 2 train like `zero` 0 on the same
global batch (losses, weights, the clipped global norm); a checkpoint saved at zero 3 with dp 2 resumes
at zero 0 with dp 1 and with pp 1, and loads into the unsplit model."""
from __future__ import annotations

import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed.checkpoint as dcp

from pp.launcher.models import GPT
from pp.launcher.train import lm_loss
from pp.parallel.zero import check_zero
from pp.testing import run_ranks
from pipes import fresh_pipe
from test_launcher_run import check_ok, losses, torchrun

MODEL = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, seq_len=8, tie_weights=True)
STEPS = 3


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, MODEL["vocab_size"], (8, MODEL["seq_len"] + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(**MODEL)


def _train(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    out = {}
    for level, schedule, precision in ((0, "1F1B", "fp32"), (1, "1F1B", "fp32"), (2, "1F1B", "fp32"),
                                       (3, "1F1B", "fp32"), (0, "ZBVZeroBubble", "fp32"),
                                       (3, "ZBVZeroBubble", "fp32"), (0, "1F1B", "bf16-mixed"),
                                       (3, "1F1B", "bf16-mixed"), (0, "1F1B", "bf16"), (3, "1F1B", "bf16")):
        mb = (_batch(0)[0][:2],)
        pipe = fresh_pipe("gpt", _model, mb, 4 if schedule == "ZBVZeroBubble" else 2)  # traced once
        par = pp.parallelize(pipe, mb, n_microbatches=2, loss_fn=lm_loss, pp=2, dp=2, schedule=schedule,
                             zero=level, precision=precision)
        decay = [p for p in par.parameters() if p.dim() >= 2]
        rest = [p for p in par.parameters() if p.dim() < 2]
        opt = par.build_optimizer(torch.optim.AdamW, [{"params": decay, "weight_decay": 0.1},
                                                      {"params": rest, "weight_decay": 0.0}], lr=1e-2)
        seen, norms = [], []
        for step in range(STEPS):
            x, y = _batch(step)
            opt.zero_grad()
            mb: list = []
            par.step(par.local_share(x), target=par.local_share(y), losses=mb)
            norms.append(par.clip_grad_norm_(0.05).item())     # small: clipping is exercised every step
            opt.step()
            seen.append([l.item() for l in mb] if par.owns_loss else [])
        held = [c.untyped_storage().size() for s in par.stages if s.bf16_weights for c in s.bf16_weights.copies]
        masters = sorted({str(p.dtype).replace("torch.", "") for _, p in par.optimizer_params()})
        state = par.state_dict()
        key = (level, schedule) if precision == "fp32" else (level, schedule, precision)
        out[key] = {"losses": seen, "norms": norms, "state": state, "optimizer": type(opt).__name__,
                    "copy_bytes_between_steps": sum(held), "copies": len(held), "masters": masters}
        if level >= 2 and schedule == "1F1B" and precision == "fp32":  # sharded masters take a state dict naming one tied alias
            torch.manual_seed(1)
            fresh = GPT(**MODEL).state_dict()
            par.load_state_dict({n: t for n, t in fresh.items() if n != "lm_head.weight"})
            x, y = _batch(0)
            mb = []
            par.step(par.local_share(x), target=par.local_share(y), losses=mb)
            out[("reload", level)] = {"state": par.state_dict(), "fresh": fresh,
                                      "losses": [l.item() for l in mb] if par.owns_loss else []}
    for level in (0, 3):  # pp 1 x dp 2 x tp 2: a column-parallel shard is a row block of its weight
        mb = (_batch(0)[0][:2],)
        par = pp.parallelize(fresh_pipe("gpt", _model, mb, 1), mb, n_microbatches=2, loss_fn=lm_loss, pp=1,
                             dp=2, tp=2, zero=level, tp_plan=_model().tp_plan())
        opt = par.build_optimizer(torch.optim.AdamW, [{"params": list(par.parameters())}], lr=1e-2)
        seen, share = [], (par.local_share(_batch(0)[0]), par.local_share(_batch(0)[1]))
        for step in range(STEPS):
            x, y = _batch(step)
            opt.zero_grad()
            mb_losses: list = []
            par.step(par.local_share(x), target=par.local_share(y), losses=mb_losses)
            opt.step()
            seen.append([l.item() for l in mb_losses])
        out[("tp", level)] = {"losses": seen, "state": par.state_dict(), "share": share,
                              "spare_bytes": [p.untyped_storage().nbytes() - p.numel() * p.element_size()
                                              for p in par.parameters() if p.untyped_storage().nbytes()]}
    for level in (1, 3):  # the optimizer the docs' plain pattern would build does not shard or train
        par = pp.parallelize(fresh_pipe("gpt", _model, mb, 2), mb, n_microbatches=2, loss_fn=lm_loss, pp=2,
                             dp=2, zero=level)
        torch.optim.AdamW(par.parameters())
        try:
            x, y = _batch(0)
            par.step(par.local_share(x), target=par.local_share(y))
            out[("plain optimizer", level)] = "ran"
        except RuntimeError as e:
            out[("plain optimizer", level)] = str(e)
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_train, 4, timeout_s=600)


@pytest.mark.parametrize("key", [(1, "1F1B"), (2, "1F1B"), (3, "1F1B"), (3, "ZBVZeroBubble"),
                                 (3, "1F1B", "bf16-mixed"), (3, "1F1B", "bf16")])
def test_zero_levels_train_like_zero_0(results, key):
    base = (0, *key[1:])
    bf16 = key[2:] == ("bf16",)  # everything in bfloat16: the shards too, so rounding differs a little
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else {}
    for rank_out in results:
        want, got = rank_out[base], rank_out[key]
        assert got["masters"] == want["masters"] == (["bfloat16"] if bf16 else ["float32"]), key
        torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(want["norms"]), **tol)
        assert len(got["losses"]) == len(want["losses"])
        for a, b in zip(got["losses"], want["losses"]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), **tol)
        assert got["state"].keys() == want["state"].keys()
        for n, t in want["state"].items():
            assert got["state"][n].dtype == t.dtype, (key, n)
            torch.testing.assert_close(got["state"][n], t, **tol, msg=lambda m: f"{key} {n}: {m}")


def test_zero_3_with_tensor_parallel_shards_trains_like_zero_0_and_the_unsplit_model(results):
    """Found by a user check: zero 3 at tp 2 freed and re-allocated storages that its tp shards shared with
    the whole weights, writing past their end (a crash in malloc on the ranks of tp rank 1)."""
    model = _model()
    for rank_out in results:
        want, got = rank_out[("tp", 0)], rank_out[("tp", 3)]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]))
        x, y = got["share"]   # this replica's rows of step 0, run on the initial weights
        unsplit = [lm_loss(model(a), b).item() for a, b in zip(x.chunk(2), y.chunk(2))]
        assert got["losses"][0] in ([], pytest.approx(unsplit, rel=1e-5)), (got["losses"][0], unsplit)
        for n, t in want["state"].items():
            torch.testing.assert_close(got["state"][n], t, msg=lambda m: f"{n}: {m}")
        assert set(want["spare_bytes"]) == {0}, "a tp shard keeps its whole weight's storage alive"


@pytest.mark.parametrize("level", [1, 3])
def test_a_step_before_build_optimizer_is_refused_at_zero_above_0(results, level):
    for rank_out in results:
        msg = rank_out[("plain optimizer", level)]
        assert msg.startswith(f"zero={level}: build the optimizer with ParallelModel.build_optimizer("), msg


@pytest.mark.parametrize("level", [2, 3])
def test_zero_2_3_load_a_state_dict_with_one_alias_of_a_tied_weight(results, level):
    got = [r[("reload", level)] for r in results]
    for r in got:
        for n, t in r["state"].items():
            torch.testing.assert_close(t, r["fresh"][n], msg=lambda m: f"{n}: {m}")
    torch.manual_seed(1)
    model = GPT(**MODEL)
    x, y = _batch(0)
    want = [lm_loss(model(x[i:i + 2]), y[i:i + 2]).item() for i in range(0, 8, 2)]
    owners = [r["losses"] for r in got if r["losses"]]
    assert len(owners) == 2  # the last stage of each replica; microbatches are the replica's halves
    torch.testing.assert_close(torch.tensor(owners[0] + owners[1]), torch.tensor(want))


def test_zero_3_frees_the_bf16_weight_copies_between_steps(results):
    for r in results:
        held0, held3 = r[(0, "1F1B", "bf16-mixed")], r[(3, "1F1B", "bf16-mixed")]
        assert held0["copies"] > 0 and held0["copy_bytes_between_steps"] > 0   # zero 0 keeps them
        assert held3["copies"] == held0["copies"] and held3["copy_bytes_between_steps"] == 0


def test_zero_1_shards_with_torch_zero_redundancy_optimizer(results):
    assert results[0][(1, "1F1B")]["optimizer"] == "ZeroRedundancyOptimizer"
    assert results[0][(3, "1F1B")]["optimizer"] == "AdamW"


def test_zero_without_replicas_is_a_no_op_that_says_so():
    with pytest.warns(UserWarning, match="zero=3 with dp=1 is a no-op"):
        assert check_zero(3, dp=1) == 0


@pytest.mark.parametrize("bad", [4, 1.0, True, "1"])
def test_bad_zero_level_is_one_line(bad):
    with pytest.raises(ValueError, match=rf"^zero={bad!r} is not a ZeRO level; expected one of 0, 1, 2, 3"):
        check_zero(bad, dp=2)


# ------------------------------------------------------------------ launcher: save at zero 3, resume
CFG = ["--model.n_layers", "2", "--model.d_model", "32", "--model.vocab_size", "256", "--train.batch_size", "8",
       "--schedule.microbatches", "2", "--train.precision", "bf16-mixed", "--train.steps", "4",
       "--checkpoint.every", "2", "--checkpoint.keep", "0"]
TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")


def _resume_from(src, out, step: int) -> None:
    os.makedirs(out / "checkpoints")
    shutil.copytree(src / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")


def test_checkpoint_saved_at_zero_3_resumes_at_zero_0_and_loads_unsplit(tmp_path):
    import pp

    a = tmp_path / "zero3"
    check_ok(torchrun(4, TINY, *CFG, "--parallel.pp", "2", "--parallel.dp", "2", "--parallel.zero", "3",
                      "--output.dir", str(a)))
    straight = losses(a)
    resumes = {}
    with ThreadPoolExecutor() as pool:   # the two resumes at once: each idles in start-up and rendezvous
        for nproc, pp_degree in ((2, "2"), (1, "1")):
            b = tmp_path / f"zero0-pp{pp_degree}"
            _resume_from(a, b, 2)
            resumes[pp_degree, b] = pool.submit(torchrun, nproc, TINY, *CFG, "--parallel.pp", pp_degree,
                                                "--parallel.zero", "0", "--checkpoint.resume", "true",
                                                "--output.dir", str(b))
    for (pp_degree, b), job in resumes.items():
        proc = job.result()
        check_ok(proc)
        assert "resumed from" in proc.log
        resumed = losses(b)
        assert sorted(resumed) == [3, 4]
        for step in (3, 4):
            assert abs(resumed[step] - straight[step]) <= 2e-3 * straight[step], (pp_degree, step)

    path = a / "checkpoints" / "step-4"
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    weights = {k: v for k, v in meta.items() if k.startswith("model.")}
    assert weights and {v.properties.dtype for v in weights.values()} == {torch.float32}  # fp32 masters
    assert {meta[k].properties.dtype for k in meta if k.endswith("exp_avg")} == {torch.float32}
    model = GPT(vocab_size=256, d_model=32, n_layers=2, n_heads=4, seq_len=64)
    pp.load_unsplit(model, str(path))
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())


def _read_between_steps(rank: int, world: int) -> dict:
    """Zero 3 at pp 1 x dp 2: what reading a whole parameter between steps does."""
    import copy

    import pp

    warnings.simplefilter("ignore")
    mb = (_batch(0)[0][:2],)
    par = pp.parallelize(fresh_pipe("gpt", _model, mb, 1), mb, n_microbatches=2, loss_fn=lm_loss, pp=1, dp=2,
                         zero=3)
    opt = par.build_optimizer(torch.optim.AdamW, lr=1e-2)
    out: dict = {}
    for step in range(2):
        x, y = _batch(step)
        opt.zero_grad()
        losses_: list = []
        par.step(par.local_share(x), target=par.local_share(y), losses=losses_)
        opt.step()
        out.setdefault("losses", []).append([l.item() for l in losses_])
        name, p = next(iter(par.named_parameters()))
        errors = []
        for read in (lambda: p.sum(), lambda: p.detach().numpy(), lambda: p * 2,
                     lambda: torch.nn.utils.parameters_to_vector([p]), lambda: copy.deepcopy(p)):
            try:
                read()
                errors.append("no error")
            except RuntimeError as e:
                errors.append(str(e))
        out["errors"] = errors
        out["meta"] = (tuple(p.shape), p.dtype, p.requires_grad, p.numel(), p.grad is None, name)
        out["repr"] = repr(p)
        out["state"] = par.state_dict()[name]       # the whole values, from the master shards
    return out


def _two_rank_cases(rank: int, world: int) -> dict:
    """The 2-rank cases in one run: they share one trace (fresh_pipe) and the fork."""
    return {"read": _read_between_steps(rank, world), "gaps": _whole_after_optimizer_step(rank, world)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_two_rank_cases, 2, timeout_s=240)


def test_reading_a_whole_parameter_between_steps_at_zero_3_says_where_the_values_are(two_ranks):
    """The whole parameters' storage is freed between steps: reading one read freed memory (a segfault,
    or garbage through numpy). It raises one sentence naming the parameter and where its values are;
    metadata stays readable, and the steps after it train as before."""
    got = [r["read"] for r in two_ranks]
    for r in got:
        name = r["meta"][5]
        assert r["meta"][:5] == (tuple(_model().get_parameter(name).shape), torch.float32, True,
                                 _model().get_parameter(name).numel(), True)
        assert len(r["errors"]) == 5
        for e in r["errors"]:
            assert f"parameter {name!r}: at zero 3 the whole parameters hold no values between steps" in e, e
        assert "released between steps at zero 3" in r["repr"]
        assert torch.isfinite(r["state"]).all()
        assert all(torch.isfinite(torch.tensor(l)).all() for l in r["losses"])
    torch.testing.assert_close(got[0]["state"], got[1]["state"])


def _whole_after_optimizer_step(rank: int, world: int) -> list:
    """Zero 2 at pp 1 x dp 2: the whole parameters against the state dict (the masters) after each
    optimizer step, before the next `step()`."""
    import pp

    warnings.simplefilter("ignore")
    mb = (_batch(0)[0][:2],)
    par = pp.parallelize(fresh_pipe("gpt", _model, mb, 1), mb, n_microbatches=2, loss_fn=lm_loss, pp=1, dp=2,
                         zero=2)
    opt = par.build_optimizer(torch.optim.SGD, lr=0.5)
    gaps = []
    for step in range(2):
        x, y = _batch(step)
        opt.zero_grad()
        par.step(par.local_share(x), target=par.local_share(y))
        opt.step()
        state = par.state_dict()
        gaps.append(max((p.detach() - state[n]).abs().max().item() for n, p in par.named_parameters()))
    return gaps


def test_zero_2_whole_parameters_follow_the_optimizer_step(two_ranks):
    """The optimizer updates only the master shards; the whole parameters (the module's, what
    `parameters()` and a `save_pretrained` of the module read) were gathered only at the next `step()`,
    so between steps they silently held the values from before the update. They are gathered right
    after each optimizer step now, as DeepSpeed does at stage 2."""
    for gaps in (r["gaps"] for r in two_ranks):
        assert gaps == [0.0, 0.0], gaps
