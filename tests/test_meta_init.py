"""No rank holds the whole model: a model built on the meta device is traced and cut there, and each rank
allocates and fills only its own stages, from an init function (per (seed, name), so weights do not
depend on the layout) or a state dict; at pp 4 each rank's peak host memory stays well under one copy."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

from pp.launcher.config import ModelConfig
from pp.launcher.models import GPT, build_model, init_fn
from pp.launcher.train import lm_loss
from pp.testing import run_ranks

CFG = ModelConfig(name="gpt", vocab_size=64, d_model=16, n_layers=4, n_heads=2, seq_len=8, tie_weights=True)


def _batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _meta_cases(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    out = {}
    whole = build_model(CFG, seed=7).state_dict()
    # a tied weight under either of its names (the state dict without the first one was refused on the
    # rank holding the embedding)
    second_alias = {k: v for k, v in whole.items() if k != "tok_emb.weight"}
    for name, kw in (("init_fn", dict(init_fn=init_fn(CFG, 7))), ("state_dict", dict(state_dict=whole)),
                     ("state_dict-second-alias", dict(state_dict=second_alias)),
                     ("init_fn-tp2", dict(init_fn=init_fn(CFG, 7), tp=2, pp=1)),
                     # rank 0 holds stages 0 and 3, so the tied embedding and head on one rank: they were
                     # made two tensors there, trained apart without a word
                     ("init_fn-zbv", dict(init_fn=init_fn(CFG, 7), schedule="ZBVZeroBubble"))):
        model = build_model(CFG, seed=7, device="meta")
        tp_plan = model.tp_plan() if "tp" in kw else None
        # the cut named: without it parallelize traces twice (once for pipe_split() calls, then by cost)
        cut = None if "tp" in kw else pp.split_by_cost(4 if "zbv" in name else 2)
        par = pp.parallelize(model, (x[:1],), n_microbatches=4, loss_fn=lm_loss, tp_plan=tp_plan,
                             split_policy=cut, **kw)
        losses: list = []
        par.step(x, target=y, losses=losses)
        out[name] = {"state": par.state_dict(), "losses": [l.item() for l in losses] if par.owns_loss else [],
                     "meta_left": any(p.is_meta for p in par.parameters()),
                     "grads": {n: par.full_tensor(n, p.grad) for n, p in par.named_parameters()}}
    for case in ("shape", "missing"):   # refused before any work, on every rank: nothing to pair up
        out["bad", case] = _bad_state_dict(rank, world, case)
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_meta_cases, 2, timeout_s=300)


@pytest.mark.parametrize("case", ["init_fn", "state_dict", "state_dict-second-alias", "init_fn-tp2", "init_fn-zbv"])
def test_meta_model_fills_each_rank_like_the_unsplit_model(results, case):
    ref = build_model(CFG, seed=7)
    want = ref.state_dict()
    x, y = _batch()
    ref_losses = [lm_loss(ref(xm), ym) for xm, ym in zip(x.chunk(4), y.chunk(4))]
    torch.stack(ref_losses).mean().backward()
    ref_losses = [l.item() for l in ref_losses]
    got_losses = []
    for rank_out in results:
        r = rank_out[case]
        assert not r["meta_left"]
        for n, t in r["state"].items():
            assert torch.equal(t, want[n]), (case, n)
        for n, g in r["grads"].items():   # the tied weight's gradient holds both uses on every rank
            torch.testing.assert_close(g, ref.get_parameter(n).grad, rtol=1e-5, atol=1e-6, msg=f"{case} {n}")
        got_losses += r["losses"]
    torch.testing.assert_close(torch.tensor(got_losses[:4]), torch.tensor(ref_losses))


def test_init_does_not_depend_on_order_or_layout():
    a = build_model(CFG, seed=7)
    b = build_model(ModelConfig(**{**CFG.__dict__, "n_layers": 6}), seed=7)  # more layers, same names agree
    fill = init_fn(CFG, 7)
    t = torch.empty(48, 16)
    fill("blocks.1.attn.qkv.weight", t)
    assert torch.equal(a.state_dict()["blocks.1.attn.qkv.weight"], t)
    assert torch.equal(b.state_dict()["tok_emb.weight"], a.state_dict()["tok_emb.weight"])


def test_meta_model_without_init_is_refused():
    import pp

    with torch.device("meta"):
        model = GPT(vocab_size=8, d_model=8, n_layers=1, n_heads=2, seq_len=4)
    with pytest.raises(ValueError, match="meta device: pass init_fn"):
        pp.parallelize(model, (torch.zeros(1, 4, dtype=torch.long),), n_microbatches=1, loss_fn=lm_loss, pp=1)


# ----------------------------------------------------------------------------- peak host memory
BIG = dict(vocab_size=256, d_model=1536, n_layers=4, n_heads=12, seq_len=16)   # 114M parameters: 455 MB fp32


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_while_building(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    with torch.device("meta"):  # load torch.export's code first: its imports are not the model's memory
        tiny = GPT(vocab_size=8, d_model=8, n_layers=2, n_heads=2, seq_len=4)
    pp.pipeline(tiny, (torch.zeros(1, 4, dtype=torch.long, device="meta"),), split_policy=pp.split_by_cost(2))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                     # VmHWM := VmRSS: the peak from here on
    before = _rss_kib("VmRSS")
    with torch.device("meta"):
        model = GPT(**BIG)
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    # the cut named: without it parallelize traces twice (once for pipe_split() calls, then by cost)
    par = pp.parallelize(model, (torch.zeros(1, BIG["seq_len"], dtype=torch.long),), n_microbatches=4,
                         loss_fn=lm_loss, init_fn=init_fn(ModelConfig(name="gpt", **BIG), 0),
                         split_policy=pp.split_by_cost(4))
    mine = sum(p.numel() * 4 for p in par.parameters())
    return {"peak": (_rss_kib("VmHWM") - before) * 1024, "model": n_bytes, "mine": mine}


def test_at_pp_4_each_rank_peaks_well_under_one_copy_of_the_model():
    got = run_ranks(_peak_while_building, 4, timeout_s=300)
    peaks = [f"{r['peak'] / 2**20:.0f}" for r in got]
    for r in got:
        assert r["mine"] < 0.4 * r["model"]
        assert r["peak"] < 0.5 * r["model"], f"peaks {peaks} MiB, model {r['model'] / 2**20:.0f} MiB"


def test_state_dict_entries_that_fill_nothing_are_refused():
    """A checkpoint saved with DDP's `module.` prefix, passed with init_fn, filled nothing and trained from
    init_fn's values without a word (found by a fresh-user check); an extra key alone was ignored too."""
    import pp

    whole = build_model(CFG, seed=7).state_dict()
    x = _batch()[0][:1]
    for bad, message in (({f"module.{k}": v for k, v in whole.items()},
                          r"state_dict has \d+ entries that the model does not have: 'module\..*each starts with "
                          r"'module'"),
                         ({**whole, "zzz.weight": torch.zeros(1)},
                          r"state_dict has 1 entry that the model does not have: 'zzz.weight'$")):
        with torch.device("meta"):
            model = GPT(vocab_size=CFG.vocab_size, d_model=CFG.d_model, n_layers=CFG.n_layers, n_heads=CFG.n_heads,
                        seq_len=CFG.seq_len, tie_weights=True)
        with pytest.raises(ValueError, match=message):
            pp.parallelize(model, (x,), n_microbatches=1, loss_fn=lm_loss, pp=1, state_dict=bad,
                           init_fn=init_fn(CFG, 7))


def _bad_state_dict(rank: int, world: int, case: str) -> str:
    import pp

    warnings.simplefilter("ignore")
    whole = build_model(CFG, seed=7).state_dict()
    if case == "shape":     # the last stage's head only: once refused by that stage's rank alone
        whole["lm_head.weight"] = torch.zeros(5, 5)
    else:
        del whole["blocks.3.mlp.fc.weight"]
    try:
        pp.parallelize(build_model(CFG, seed=1), (_batch()[0][:1],), n_microbatches=2, loss_fn=lm_loss, pp=2,
                       state_dict=whole)
    except ValueError as e:
        return str(e)
    return "built"


@pytest.mark.parametrize("case, message", [
    ("shape", "state_dict['lm_head.weight'] has shape (5, 5), the model (64, 16)"),
    ("missing", "state_dict lacks 1 of the model's tensors: 'blocks.3.mlp.fc.weight'"),
])
def test_a_state_dict_one_stage_cannot_take_is_refused_by_every_rank(results, case, message):
    """A mis-shaped or missing entry was found only by the rank whose stage holds it: the other rank built
    its stages and waited in its first step (a hang under run_ranks, gloo's raw error under torchrun)."""
    got = [r["bad", case] for r in results]
    assert all(message in r for r in got), got


def test_state_dict_values_without_data_are_refused_by_name():
    from pp.parallel.meta import check_keys

    model = build_model(CFG, seed=1)
    whole = model.state_dict()
    for value, said in (([1.0], "state_dict['lm_head.weight'] is list"),
                        (whole["lm_head.weight"].to("meta"), "state_dict['lm_head.weight'] is a meta tensor")):
        with pytest.raises(ValueError, match=re.escape(said)):
            check_keys(model, {**whole, "lm_head.weight": value})
