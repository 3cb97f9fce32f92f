"""Compiled stages (`schedule.compile`, `pp.parallelize(compile=True)`): on 2 gloo ranks with inductor on
CPU, losses and gradients equal eager (and the unsplit model) for 1F1B and the I/W-split ZBVZeroBubble,
traced and manual stages, per block and per stage; the compile count stays put at a known shape."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from pp.launcher.models import GPT
from pp.launcher.train import lm_loss
from pp.testing import run_ranks

MODEL = dict(vocab_size=32, d_model=16, n_layers=4, n_heads=2, seq_len=8)
N_MB = 4
STEPS = 3
# (schedule, compile per, stage form): traced stages cut by pp.parallelize, manual ones by hand;
# "traced-full": traced with activation_checkpointing="full" (fp32, the I/W split's once-per-microbatch
# recompute inside compiled blocks: it crashed before its parameters were handed over as parameters)
# (ZBVZeroBubble's traced stages run compiled by default with checkpointing, "traced-full"; without it they
# are among the slow cases, for CI's time budget). 1F1B runs the default granularity (one region per stage).
CASES = [("1F1B", "stage", "traced"), ("ZBVZeroBubble", "block", "manual"), ("ZBVZeroBubble", "block", "traced-full")]
# the other I/W-split and interleaved schedules, and the other granularities (deselected by default)
SLOW_CASES = [("1F1B", "block", "traced"), ("ZBVZeroBubble", "block", "traced"), ("ZBVZeroBubble", "stage", "traced"),
              ("Interleaved1F1B", "block", "traced"),
              ("InterleavedZeroBubble", "block", "traced"), ("DualPipeV", "block", "traced"),
              ("ZBVHalf", "block", "traced"), ("ZBVMin", "block", "traced")]


def _batch(step: int):
    g = torch.Generator().manual_seed(3 + step)
    tokens = torch.randint(0, MODEL["vocab_size"], (N_MB * 2, MODEL["seq_len"] + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


class _Part(nn.Module):
    """A manual stage of the GPT: embeddings (first), blocks, head (last)."""

    def __init__(self, model: GPT, blocks: slice, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.tok_emb, self.pos_emb = (model.tok_emb, model.pos_emb) if first else (None, None)
        self.blocks = nn.ModuleList(model.blocks[blocks])
        self.norm, self.lm_head = (model.norm, model.lm_head) if last else (None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.tok_emb(x) + self.pos_emb(torch.arange(x.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x)) if self.last else x


def _manual(rank: int, model: GPT, name: str):
    from pp import PipelineStage
    from pp.schedules.classes import schedule_class
    # V placement on 2 ranks: rank 0 holds stages 0 and 3, rank 1 stages 1 and 2; two blocks each
    stages = [PipelineStage(_Part(model, slice(2 * s, 2 * s + 2), s == 0, s == 3), s, 4, "cpu")
              for s in ((0, 3) if rank == 0 else (1, 2))]
    for st in stages:
        st.names = {n: p for n, p in st.submod.named_parameters()}
    return schedule_class(name)(stages, N_MB, loss_fn=lm_loss), stages


def _train(rank: int, name: str, per: str | None, form: str) -> dict:
    import pp
    torch.manual_seed(0)
    traced = form.startswith("traced")
    model = GPT(**MODEL) if traced else GPT(**{**MODEL, "n_layers": 8})
    if traced:
        x, _ = _batch(0)
        par = pp.parallelize(model, (x[:2],), n_microbatches=N_MB, loss_fn=lm_loss, schedule=name,
                             compile=per is not None, compile_per=per or "block",
                             activation_checkpointing="full" if form == "traced-full" else "none")
        sched, named = par.schedule, dict(par.named_parameters())
    else:
        sched, stages = _manual(rank, model, name)
        if per is not None:
            sched.compile(per=per)
        named = {n: p for st in stages for n, p in st.names.items()}
    out: dict = {"losses": [], "counts": []}
    for step in range(STEPS):
        for p in named.values():
            p.grad = None
        x, y = _batch(step)
        losses: list = []
        sched.step(x, target=y, losses=losses)
        out["losses"].append([float(l) for l in losses])
        out["counts"].append(sched.compile_count)
    out["grads"] = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    return out


def _all_cases(rank: int, world: int, cases: list, extras: bool) -> dict:
    warnings.simplefilter("ignore")
    out = {}
    for name, per, form in cases:
        out[("eager", name, form)] = _train(rank, name, None, form)
        out[(per, name, form)] = _train(rank, name, per, form)
    if extras:
        out["refusals"] = _refusals(rank)
        out["iw"] = _split_backward_runs(rank)
    return out


def _split_backward_runs(rank: int) -> dict:
    """I and W of a compiled block between two eager Linears: how often the block's fused backward runs,
    whether its weights have gradients after I, and whether I + W equal one plain backward."""
    from pp.stage.backward import input_grads, weight_grads
    from pp.stage.compiled import CompileCounter, compile_stage

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 16), GPT(**MODEL).blocks[0], nn.Linear(16, 16))
    x = torch.randn(2, 8, 16)
    want = torch.autograd.grad(model(x).square().sum(), list(model.parameters()))
    compile_stage(model[1], CompileCounter("inductor", None, None, keep_graph=True), "stage")
    h = x.requires_grad_()
    y = model(h)
    runs = []
    stack, seen = [y.grad_fn], set()
    while stack:   # the compiled block's backward node(s)
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        if type(n).__name__ == "CompiledFunctionBackward":
            n.register_hook(lambda *a: runs.append(1))
        stack.extend(c for c, _ in n.next_functions)
    loss = y.square().sum()
    got, pending = input_grads([loss], [torch.ones_like(loss)], [h])
    after_i = (len(runs), all(p.grad is not None for p in model[1].parameters()), model[2].weight.grad is None)
    weight_grads(pending)
    exact = all(torch.allclose(p.grad, w, rtol=1e-4, atol=1e-5) for p, w in zip(model.parameters(), want))
    return {"after_i": after_i, "runs": len(runs), "exact": exact}


def _refusals(rank: int) -> list[str]:
    """The errors of arguments compile() cannot honour (nothing gets compiled here)."""
    got = []
    for call in (lambda s: s.compile(per="layer"), lambda s: s.compile(mode="fastest"),
                 lambda s: (s.compile(), s.compile()),
                 lambda s: (s.compile(mode="reduce-overhead"), s.enable_cuda_graphs())):
        sched, _ = _manual(rank, GPT(**{**MODEL, "n_layers": 8}), "ZBVZeroBubble")
        try:
            call(sched)
            got.append("no error")
        except ValueError as e:
            got.append(str(e))
    return got


@pytest.fixture(scope="module")
def results():
    return run_ranks(_all_cases, 2, CASES, True, timeout_s=600)


@pytest.fixture(scope="module")
def slow_results():
    return run_ranks(_all_cases, 2, SLOW_CASES, False, timeout_s=900)


def _check_equal_eager(results, name, per, form):
    for rank_out in results:
        want, got = rank_out[("eager", name, form)], rank_out[(per, name, form)]
        torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-5, atol=1e-5)
        assert got["grads"].keys() == want["grads"].keys() and got["grads"]
        for n, g in want["grads"].items():
            torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-5, msg=f"{name} {per} {n}")
        counts = got["counts"]
        assert counts[0] >= 1 and counts[1] == counts[2], counts   # no recompile at a known shape
        assert rank_out[("eager", name, form)]["counts"] == [0] * STEPS


@pytest.mark.parametrize("name,per,form", CASES)
def test_compiled_stages_equal_eager_and_compile_once(results, name, per, form):
    _check_equal_eager(results, name, per, form)


@pytest.mark.slow
@pytest.mark.parametrize("name,per,form", SLOW_CASES)
def test_compiled_stages_equal_eager_other_schedules(slow_results, name, per, form):
    _check_equal_eager(slow_results, name, per, form)


def test_compiled_losses_match_the_unsplit_model(results):
    torch.manual_seed(0)
    model = GPT(**MODEL)
    x, y = _batch(0)
    want = [lm_loss(model(xm), ym).item() for xm, ym in zip(x.chunk(N_MB), y.chunk(N_MB))]
    for name, per, form in [c for c in CASES if c[2].startswith("traced")]:
        got = [l for r in results for l in r[(per, name, form)]["losses"][0]]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{name} {per} {form}")


@pytest.mark.parametrize("precision, checkpointing", [
    ("bf16-mixed", "selective"),
    # in-process, the "traced-full" case covers fp32 + full checkpointing against eager
    pytest.param("fp32", "full", marks=pytest.mark.slow)])
def test_pp_run_with_schedule_compile_trains_and_reports_compiles(tmp_path, precision, checkpointing):
    # ZBVZeroBubble (I/W split) with checkpointing inside compiled blocks. fp32: the blocks take the
    # parameters themselves, and the I/W split's once-per-microbatch recompute must hand them over as
    # parameters too, or the compiled region compiles a second graph whose saved tensors do not line up
    # (a crash in the first I, found by a new-user walk-through); its losses equal the eager run's.
    import json
    import os

    from test_launcher_run import check_ok, losses, torchrun, write_config

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "cfg.yaml", out, pp=2, schedule="ZBVZeroBubble", steps=3, every=0,
                       model={"d_model": 16, "n_heads": 2, "seq_len": 16})
    knobs = ["--train.precision", precision, "--train.activation_checkpointing", checkpointing]
    proc = torchrun(2, cfg, "--schedule.compile", "true", *knobs, timeout=400)
    check_ok(proc)
    assert sorted(losses(out)) == [1, 2, 3]
    if precision == "fp32":
        eager = torchrun(2, cfg, *knobs, "--output.dir", str(tmp_path / "eager"))
        check_ok(eager)
        want = losses(tmp_path / "eager")
        got = losses(out)
        assert all(abs(got[k] - want[k]) < 1e-4 for k in want), (got, want)
    with open(os.path.join(out, "summary.json")) as f:
        ranks = json.load(f)["ranks"]
    assert all(r["compiles"] >= 1 for r in ranks), ranks
    assert "graphs compiled" in proc.stdout


@pytest.mark.parametrize("overrides, expected", [
    (["--schedule.compile", "maybe"], "schedule.compile: expected true or false, got 'maybe'"),
    (["--schedule.compile", "true", "--schedule.compile_per", "layer"],
     "schedule.compile_per='layer': expected 'block' or 'stage'"),
    (["--schedule.compile", "true", "--schedule.compile_per", "stage", "--train.activation_checkpointing", "full"],
     "schedule.compile_per='stage' with train.activation_checkpointing='full'"),
])
def test_bad_compile_config_is_one_line(tmp_path, overrides, expected, monkeypatch, capsys):
    from test_launcher_config import TINY

    from pp.run import EXIT_CONFIG, main

    path = tmp_path / "cfg.yaml"
    path.write_text(TINY.replace("OUT", str(tmp_path / "out")))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert main([str(path), *overrides]) == EXIT_CONFIG
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pp.run: bad config: ") and expected in lines[0], lines


def test_compile_refuses_what_it_cannot_do_in_one_sentence(results):
    per, mode, twice, graphs = results[0]["refusals"]
    assert "per='layer' is not a compile granularity; expected 'block' or 'stage'" in per
    assert "mode='fastest' is not an inductor mode" in mode
    assert "compile() ran on this schedule already" in twice
    assert "mode='reduce-overhead' captures CUDA graphs inside inductor" in graphs


def test_zero_bubble_runs_a_compiled_backward_once_and_takes_its_weight_grads_in_i(results):
    # I runs the block's fused backward once and accumulates its weight gradients; W only the eager
    # Linear's, never the compiled node again; together exact
    iw = results[0]["iw"]
    assert iw["after_i"] == (1, True, True), iw
    assert iw["runs"] == 1 and iw["exact"], iw


def test_default_granularity_is_the_stage_or_each_checkpointed_block():
    # per=None: one region per stage (less host time per step than one per block, measured on H200s);
    # a checkpointed stage compiles inside each checkpointed block instead, where per="stage" is refused
    from pp.parallel.checkpointing import apply_checkpointing
    from pp.stage.compiled import CompileCounter, compile_stage

    def counter():
        return CompileCounter("inductor", None, None, keep_graph=False)

    plain, checkpointed, by_block = GPT(**MODEL), GPT(**MODEL), GPT(**MODEL)
    apply_checkpointing(checkpointed, "full")
    assert compile_stage(plain, counter()) == 1
    assert compile_stage(checkpointed, counter()) == len(checkpointed.blocks) > 1
    assert compile_stage(by_block, counter(), "block") == len(by_block.blocks)
    with pytest.raises(ValueError, match="per='stage' with activation checkpointing"):
        ckpt = GPT(**MODEL)
        apply_checkpointing(ckpt, "full")
        compile_stage(ckpt, counter(), "stage")
