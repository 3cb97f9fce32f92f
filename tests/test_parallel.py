"""PP × TP and PP × DP: `pp.parallelize` on 4 gloo ranks and `torchrun -m pp.run` on 4 processes give
the losses and gradients of the pp-only / unsplit model on the same global batch.

One spawn of 4 ranks runs every API case (a module fixture); the tests then check one property each
against the unsplit model computed here. The launcher runs are real torchrun jobs, few and short.
"""
from __future__ import annotations

import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pp.launcher.models import GPT
from pp.launcher.train import lm_loss
from pp.testing import run_ranks
from test_launcher_run import check_ok, torchrun

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "pp_tp_dp.py")
MODEL = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=4, seq_len=8, tie_weights=True)
BATCH = 8
# name -> parallelize() arguments, all on 4 ranks. Microbatches of 2 sequences everywhere, so that the
# two 2-stage cases share one traced Pipe.
CASES = {
    "pp2-tp2": dict(pp=2, tp=2, schedule="1F1B", n_microbatches=4),
    "pp2-dp2": dict(pp=2, dp=2, schedule="1F1B", n_microbatches=2),
    "pp2-dp2-zbv": dict(pp=2, dp=2, schedule="ZBVZeroBubble", n_microbatches=2),  # 2 stages/rank, I/W
}


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(**MODEL)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, MODEL["vocab_size"], (BATCH, MODEL["seq_len"] + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _run_cases(rank: int, world: int) -> dict:
    """Every case on this rank: its losses, whole gradients and sync order after one step."""
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    model = _model()
    mb = (torch.zeros(2, MODEL["seq_len"], dtype=torch.long),)
    pipes = {2: pp.pipeline(model, mb, split_policy=pp.split_by_cost(2))}
    seen = {}
    for name, kw in CASES.items():
        n_stages = 4 if "zbv" in name else 2
        source = pipes.get(n_stages, model)  # the ZBV case cuts the model itself, into 4 stages
        # a cut named for it (as pp.run names one): without, parallelize traces twice (pipe_split(), then cost)
        cut = dict(split_policy=pp.split_by_cost(n_stages)) if source is model else {}
        par = pp.parallelize(source, mb, loss_fn=lm_loss, tp_plan=model.tp_plan() if "tp" in kw else None,
                             **cut, **kw)
        losses: list = []
        par.step(par.local_share(x), target=par.local_share(y), losses=losses)
        grads = {n: par.full_tensor(n, p.grad) for n, p in par.named_parameters()}
        norm = par.clip_grad_norm_(1e9)     # a float32 0-dim tensor, as torch's; 1e9 clips nothing
        assert isinstance(norm, torch.Tensor) and norm.shape == () and norm.dtype == torch.float32
        norms = {"norm": norm.item(), "norm_inf": par.clip_grad_norm_(torch.tensor(1e9), norm_type="inf").item(),
                 "norm_1": par.clip_grad_norm_(1e9, norm_type=1).item()}
        if name == "pp2-dp2":   # one rank's infinite gradient makes every rank refuse, as torch's check does
            p = next(q for q in par.parameters() if q.grad is not None)
            kept, p.grad = p.grad, torch.full_like(p.grad, float("inf")) if par.dp_rank == 0 else p.grad
            try:
                par.clip_grad_norm_(1.0, error_if_nonfinite=True)
                norms["nonfinite"] = "no error"
            except RuntimeError as e:
                norms["nonfinite"] = str(e)
            p.grad = kept
            saved = [g.clone() for g in par.grads()]
            par.clip_grad_norm_(0.0)   # torch's max_norm=0 zeroes every gradient
            norms["zeroed"] = all(not g.any() for g in par.grads())
            torch._foreach_copy_(par.grads(), saved)
        seen[name] = {**norms, "losses": [l.item() for l in losses] if par.owns_loss else [], "grads": grads,
                      "coords": (par.pp_rank, par.dp_rank, par.tp_rank),
                      "local": {n: tuple(p.shape) for n, p in par.named_parameters()},
                      "order": par.grad_sync.last_order if par.grad_sync else None,
                      "stages": [s.stage_index for s in par.stages]}
        par.zero_grad()  # the cases share the untouched parameters of `model`
    frozen = _frozen_pipe()   # traced once, for both zero levels
    seen["frozen"] = _frozen_first_stage(frozen, x, y, zero=0)
    seen["frozen-zero3"] = _frozen_first_stage(frozen, x, y, zero=3)
    seen["example"] = _run_example("--tp", "2", "--steps", "4")  # last: it destroys the process group
    return seen


FROZEN = ("tok_emb", "pos_emb", "blocks.0")   # all of stage 0 (a common fine-tuning setup)
CLIP = 0.01                                   # below the norm: the clip scales every gradient


def _frozen_model() -> GPT:
    model = GPT(**{**MODEL, "tie_weights": False})
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN))
    return model


def _frozen_pipe():
    """The frozen model cut before blocks.1: stage 0 is all frozen."""
    import pp

    torch.manual_seed(0)
    return pp.pipeline(_frozen_model(), (torch.zeros(2, MODEL["seq_len"], dtype=torch.long),),
                       split_spec={"blocks.1": pp.SplitPoint.BEGINNING})


def _frozen_first_stage(pipe, x: torch.Tensor, y: torch.Tensor, zero: int) -> dict:
    """pp 2 x dp 2 with stage 0 wholly frozen, clipped: once failed in the clip (no gradient to scale),
    and at zero 2/3 in the norm (a frozen parameter has no master shard)."""
    import copy

    import pp

    par = pp.parallelize(copy.deepcopy(pipe), (torch.zeros(2, MODEL["seq_len"], dtype=torch.long),),
                         loss_fn=lm_loss, pp=2, dp=2, n_microbatches=2, zero=zero)
    par.build_optimizer()
    par.step(par.local_share(x), target=par.local_share(y))
    norm = par.clip_grad_norm_(CLIP).item()
    return {"norm": norm, "grads": {n: par.full_tensor(n, p.grad) for n, p in par.named_parameters()
                                    if p.grad is not None}}


def _run_example(*argv: str) -> str:
    """What the README's parallelize example (examples/pp_tp_dp.py) prints on this rank."""
    import contextlib
    import io
    import runpy
    import sys

    out = io.StringIO()
    sys.argv = [EXAMPLE, *argv]
    with contextlib.redirect_stdout(out):
        runpy.run_path(EXAMPLE, run_name="__main__")
    return out.getvalue()


@pytest.fixture(scope="module")
def ranks_seen() -> list[dict]:
    return run_ranks(_run_cases, 4, timeout_s=150)


@pytest.fixture(scope="module")
def reference() -> dict:
    """The unsplit model on the global batch: per-microbatch losses, their mean's gradients and norm."""
    model = _model()
    x, y = _batch()
    losses = [lm_loss(model(a), b) for a, b in zip(x.chunk(4), y.chunk(4))]
    torch.stack(losses).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    params = list(model.parameters())
    norms = {"norm_inf": torch.nn.utils.get_total_norm([p.grad for p in params], float("inf")).item(),
             "norm_1": torch.nn.utils.get_total_norm([p.grad for p in params], 1).item()}
    norm = torch.nn.utils.clip_grad_norm_(params, 1e9).item()
    return {"loss": torch.stack(losses).mean().item(), "grads": grads, "norm": norm, **norms}


@pytest.mark.parametrize("case", list(CASES))
def test_global_mean_loss_equals_unsplit_model(ranks_seen, reference, case):
    losses = [l for r in ranks_seen for l in r[case]["losses"]]
    kw = CASES[case]
    assert len(losses) == kw["n_microbatches"] * kw.get("dp", 1)  # one loss-owning rank per replica
    assert sum(losses) / len(losses) == pytest.approx(reference["loss"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_gathered_gradients_equal_unsplit_model_on_every_rank(ranks_seen, reference, case):
    covered = set()
    for rank, seen in enumerate(ranks_seen):
        for name, g in seen[case]["grads"].items():
            torch.testing.assert_close(g, reference["grads"][name], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"rank {rank} {case} {name}: {m}")
            covered.add(name)
    assert covered == set(reference["grads"])   # the tied lm_head/tok_emb weight is one name


@pytest.mark.parametrize("case", list(CASES))
def test_global_grad_norm_counts_each_parameter_once(ranks_seen, reference, case):
    for seen in ranks_seen:
        for order in ("norm", "norm_inf", "norm_1"):   # norm_type 2, inf and 1, as torch's clip_grad_norm_
            assert seen[case][order] == pytest.approx(reference[order], rel=1e-5), order
        if case == "pp2-dp2":
            assert seen[case]["nonfinite"].startswith("The total norm of order 2.0 for gradients"), seen[case]
            assert seen[case]["zeroed"]


def test_a_wholly_frozen_stage_trains_and_clips_like_the_unsplit_model(ranks_seen):
    torch.manual_seed(0)
    model = _frozen_model()
    x, y = _batch()
    torch.stack([lm_loss(model(a), b) for a, b in zip(x.chunk(4), y.chunk(4))]).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP).item()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    got: dict = {}
    for seen in ranks_seen:
        assert seen["frozen"]["norm"] == pytest.approx(norm, rel=1e-5)
        assert seen["frozen-zero3"]["norm"] == pytest.approx(norm, rel=1e-5)   # gradients in the master shards
        got.update(seen["frozen"]["grads"])
    assert got.keys() == want.keys() and not any(n.startswith(FROZEN) for n in got)
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_tp_ranks_hold_local_heads_and_the_mesh_puts_tp_innermost(ranks_seen):
    for rank, seen in enumerate(ranks_seen):
        s = seen["pp2-tp2"]
        assert s["coords"] == (rank // 2, 0, rank % 2)
        if 0 in s["stages"]:
            assert s["local"]["blocks.0.attn.qkv.weight"] == (3 * 16 // 2, 16)
            assert s["local"]["blocks.0.mlp.proj.weight"] == (16, 4 * 16 // 2)
        assert seen["pp2-dp2"]["coords"] == (rank // 2, rank % 2, 0)


def test_dp_sync_starts_per_stage_when_its_last_backward_is_done(ranks_seen):
    for seen in ranks_seen:
        assert seen["pp2-dp2"]["order"] == seen["pp2-dp2"]["stages"]
        # V placement: rank 0 holds stages 0 and 3; stage 3's backward ends first
        assert seen["pp2-dp2-zbv"]["order"] == sorted(seen["pp2-dp2-zbv"]["stages"], reverse=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_microbatches=0), "n_microbatches must be a positive integer, got 0"),
    (dict(dp=0), "dp must be a positive integer, got 0"),
    (dict(pp=1, tp=2), "tp=2 needs a tp_plan"),
    (dict(tp_plan=["blocks.0.mlp.fc"]), "tp_plan must map module names to pp.tp styles, got list"),
    pytest.param(dict(device="cuda"), "device='cuda', but this torch sees no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")),
])
def test_bad_arguments_fail_before_any_communication(kwargs, message):
    import pp

    args = {"n_microbatches": 2, "loss_fn": lm_loss, **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        pp.parallelize(_model(), (torch.zeros(2, 8, dtype=torch.long),), **args)


def test_a_module_that_is_no_nn_module_is_named():
    """A function in place of the model was a bare AttributeError ('function' has no 'parameters')."""
    import pp

    with pytest.raises(TypeError, match="module must be an nn.Module or a pp.Pipe, got function"):
        pp.parallelize(lambda t: t * 2, (torch.zeros(2, 8),), n_microbatches=2, loss_fn=lm_loss)


def test_docs_example_trains_with_pp2_tp2(ranks_seen):
    printed = [r["example"] for r in ranks_seen]
    assert [bool(p) for p in printed] == [False, False, True, False]  # last stage, tp rank 0
    losses = [float(line.split()[3]) for line in printed[2].splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    readme = open(os.path.join(os.path.dirname(EXAMPLE), "..", "docs", "parallelism.md")).read()
    block = readme.split("`examples/pp_tp_dp.py` runs with", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    source = open(EXAMPLE).read()
    for line in block.strip().splitlines():
        assert line.strip() in source, f"README line not in examples/pp_tp_dp.py: {line}"


# ------------------------------------------------------------------------- the launcher, torchrun

LAUNCH = """model: {name: gpt, vocab_size: 256, d_model: 32, n_layers: 2, n_heads: 4, seq_len: 16}
parallel: {pp: 2, timeout_s: 120}
schedule: {name: 1F1B, microbatches: 2}
train: {steps: 6, batch_size: 8, lr: 0.003, seed: 0, warmup_steps: 2}
checkpoint: {every: 3, resume: false}
"""


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    """{pp:2} on 2 ranks and {pp:2, dp:2} on 4, six steps each; then {pp:2, tp:2} on 4 ranks resumes the
    dp run's step-3 checkpoint (whole tensors, re-cut into tp shards) and runs steps 4..6."""
    root = tmp_path_factory.mktemp("launch")
    cfg = root / "cfg.yaml"
    cfg.write_text(LAUNCH)
    out = {name: root / name for name in ("ref", "tp", "dp")}
    with ThreadPoolExecutor() as pool:   # the two independent jobs at once: each idles in start-up and rendezvous
        ref = pool.submit(torchrun, 2, str(cfg), "--output.dir", str(out["ref"]))
        dp = pool.submit(torchrun, 4, str(cfg), "--parallel.dp", "2", "--output.dir", str(out["dp"]))
        procs = {"ref": ref.result(), "dp": dp.result()}
    check_ok(procs["dp"])
    shutil.copytree(out["dp"] / "checkpoints" / "step-3", out["tp"] / "checkpoints" / "step-3")
    procs["tp"] = torchrun(4, str(cfg), "--parallel.tp", "2", "--output.dir", str(out["tp"]),
                           "--checkpoint.resume", "true")
    for proc in procs.values():
        check_ok(proc)
    return {"out": out, "procs": procs}


def _losses(out_dir) -> dict[int, float]:
    from pp.launcher.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out_dir, "metrics.jsonl"))}


def test_launcher_pp2_dp2_losses_match_pp2(launched):
    ref, got = _losses(launched["out"]["ref"]), _losses(launched["out"]["dp"])
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    assert "2 stages on 4 ranks (cpu, pp=2 x dp=2 x tp=1)" in launched["procs"]["dp"].stdout


def test_launcher_pp2_tp2_resumes_the_dp_checkpoint_and_matches_pp2(launched):
    ref, got = _losses(launched["out"]["ref"]), _losses(launched["out"]["tp"])
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-5), step
    assert "saved with pp=2, dp=2, tp=1" in launched["procs"]["tp"].stdout


def test_checkpoints_hold_whole_tensors_whatever_the_layout(launched):
    import torch.distributed.checkpoint as dcp

    from pp import load_unsplit

    def sizes(name: str) -> dict:
        meta = dcp.FileSystemReader(str(launched["out"][name] / "checkpoints" / "step-6")).read_metadata()
        return {k: tuple(getattr(v, "size", ())) for k, v in meta.state_dict_metadata.items()}

    assert sizes("tp") == sizes("ref") == sizes("dp")
    x = torch.randint(0, 256, (2, 16))
    outputs = {}
    for name in ("ref", "tp", "dp"):
        model = GPT(256, 32, 2, 4, 16)
        load_unsplit(model, str(launched["out"][name]))
        with torch.no_grad():
            outputs[name] = model(x)
    torch.testing.assert_close(outputs["tp"], outputs["ref"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outputs["dp"], outputs["ref"], rtol=1e-4, atol=1e-4)


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


def _replica_buffers(rank: int, world: int) -> dict:
    import pp

    torch.manual_seed(0)
    model = _Normed()
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.randn(8, 2)
    par = pp.parallelize(model, (x[:2],), n_microbatches=2, loss_fn=F.mse_loss, pp=1, dp=2)
    half = slice(4 * rank, 4 * rank + 4)
    par.step(x[half], target=y[half])
    return {k: v.clone() for k, v in par.state_dict().items() if "bn." in k}


def test_buffers_the_forward_updates_are_averaged_over_the_replicas():
    """Batch norm's running statistics under dp 2: each replica updated them from its own share of the
    batch and kept them, so replicas evaluated differently and the checkpoint (replica 0's) gave another
    validation loss than the run reported (found by a fresh-user run of pp.run; resume was not exact).
    They are averaged over the replicas after every step: both replicas hold the mean of what each
    would hold alone."""
    got = run_ranks(_replica_buffers, 2, timeout_s=120)
    alone = []
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    for rank in range(2):
        torch.manual_seed(0)
        model = _Normed()
        for part in x[4 * rank:4 * rank + 4].chunk(2):   # its two microbatches
            model(part)
        alone.append(model.bn)
    for name in ("running_mean", "running_var"):
        want = (getattr(alone[0], name) + getattr(alone[1], name)) / 2
        for replica in got:
            torch.testing.assert_close(replica[f"bn.{name}"], want, msg=name)
    assert torch.equal(got[0]["bn.num_batches_tracked"], got[1]["bn.num_batches_tracked"])
