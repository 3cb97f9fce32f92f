"""Activation checkpointing (`full`, `selective`) gives the losses and gradients of `none` bit for bit,
for every schedule, traced and manual stages alike, and with the zero-bubble I/W split each block is
recomputed once per microbatch."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from pp.launcher.models import GPT
from pp.launcher.train import lm_loss
from pp.parallel.checkpointing import Checkpointed, apply_checkpointing, check_mode, regions
from pp.schedules.registry import SCHEDULES
from pp.testing import run_ranks
from pipes import fresh_pipe

MODEL = dict(vocab_size=32, d_model=16, n_layers=4, n_heads=2, seq_len=8)
N_MB = 4
MODES = ("none", "selective", "full")


def _batch():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, MODEL["vocab_size"], (N_MB * 2, MODEL["seq_len"] + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(**MODEL)


def _every_schedule(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    mb = (x[:2],)
    out = {}
    for mode in MODES:
        for name, spec in SCHEDULES.items():
            pipe = fresh_pipe("gpt", _model, mb, spec.n_stages(world))  # traced once per stage count
            par = pp.parallelize(pipe, mb, n_microbatches=N_MB, loss_fn=lm_loss, schedule=name,
                                 activation_checkpointing=mode)
            losses: list = []
            par.step(x, target=y, losses=losses)
            runs = [r.runs for st in par.stages for r in regions(st.submod)]
            out[(mode, name)] = {"losses": [l.item() for l in losses],
                                 "grads": {n: p.grad.clone() for n, p in par.named_parameters()},
                                 "runs": runs, "split": spec.split_backward}
    out["tp"] = _tp_cases(rank, world)   # in the same run: a run costs a fork
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_every_schedule, 2, timeout_s=600)


@pytest.mark.parametrize("mode", ["selective", pytest.param("full", marks=pytest.mark.slow)])
def test_checkpointing_equals_none_bit_for_bit_for_every_schedule(results, mode):
    for rank_out in results:
        for name in SCHEDULES:
            want, got = rank_out[("none", name)], rank_out[(mode, name)]
            assert got["losses"] == want["losses"], name
            assert got["grads"].keys() == want["grads"].keys()
            for n, g in want["grads"].items():
                assert torch.equal(got["grads"][n], g), (name, n)
            assert got["runs"], f"{name}: no block was checkpointed"


def test_each_block_recomputes_once_per_microbatch(results):
    # Each block runs forward and recompute once per microbatch, also when I and W are separate
    # backward calls.
    for rank_out in results:
        for name in SCHEDULES:
            for mode in ("selective", "full"):
                runs = rank_out[(mode, name)]["runs"]
                assert runs == [2 * N_MB] * len(runs), (name, mode, runs)


def test_losses_match_the_unsplit_model(results):
    torch.manual_seed(0)
    model = GPT(**MODEL)
    x, y = _batch()
    want = [lm_loss(model(xm), ym).item() for xm, ym in zip(x.chunk(N_MB), y.chunk(N_MB))]
    got = results[1][("full", "1F1B")]["losses"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want))


class _Manual(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.LayerNorm(8)) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


@pytest.mark.parametrize("once", [False, True])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_manual_stage_blocks_recompute_and_match(mode, once):
    torch.manual_seed(0)
    ref = _Manual()
    x = torch.randn(4, 8)
    ref(x).square().sum().backward()
    torch.manual_seed(0)
    model = _Manual()
    wrapped = apply_checkpointing(model, mode, once=once)
    assert len(wrapped) == 3 and all(isinstance(w, Checkpointed) for w in wrapped)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    model(x).square().sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), n
    assert [w.runs for w in wrapped] == [2, 2, 2]


def test_bad_mode_is_one_line_naming_it():
    with pytest.raises(ValueError, match=r"activation_checkpointing='yes' .*none, selective, full"):
        check_mode("yes")


def _tp_cases(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    out = {}
    for mode, precision in (("none", "fp32"), ("selective", "fp32"), ("full", "fp32"), ("none", "bf16-mixed"),
                            ("full", "bf16-mixed")):
        par = pp.parallelize(fresh_pipe("gpt", _model, (x[:2],), 1), (x[:2],), n_microbatches=N_MB,
                             loss_fn=lm_loss, pp=1, tp=2, tp_plan=_model().tp_plan(),
                             activation_checkpointing=mode, precision=precision)
        losses: list = []
        par.step(x, target=y, losses=losses)
        out[(mode, precision)] = {"losses": [l.item() for l in losses],
                                  "grads": {n: par.full_tensor(n, p.grad) for n, p in par.named_parameters()}}
    return out


def test_checkpointing_with_tensor_parallel_blocks_and_bf16_mixed_equals_none(results):
    for r in (rank_out["tp"] for rank_out in results):
        for mode, precision in (("selective", "fp32"), ("full", "fp32"), ("full", "bf16-mixed")):
            want, got = r[("none", precision)], r[(mode, precision)]
            assert got["losses"] == want["losses"], (mode, precision)
            for n, g in want["grads"].items():
                assert torch.equal(got["grads"][n], g), (mode, precision, n)
