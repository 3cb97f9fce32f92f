"""Mixed precision on the models users bring: a stage with nothing to cast (frozen, or only 1-D
parameters) trains; the loss runs under the forward's autocast as in the unsplit `with autocast:` loop;
tied weights under pure bfloat16 on three ranks train as one; a loss_fn that returns several losses is
refused in one sentence. Right values come from the unsplit model."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pp.launcher.models import GPT
from pp.launcher.train import lm_loss
from pp.testing import RankError, run_ranks
from pipes import fresh_pipe

MODEL = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, seq_len=16)


def _cut(n_stages: int):
    """The cut named, as pp.run names it: without one, parallelize traces twice (once for pipe_split()
    calls, then by cost), and tracing dominates these tests."""
    import pp

    return pp.split_by_cost(n_stages)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, MODEL["vocab_size"], (8, MODEL["seq_len"] + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _frozen_front(model: GPT) -> GPT:
    for name, p in model.named_parameters():
        if not name.startswith(("blocks.3", "ln_f", "lm_head")):
            p.requires_grad_(False)
    return model


def _unsplit_bf16_mixed(model: nn.Module, x, y, n_mb: int, loss_fn=lm_loss) -> tuple[list[float], dict]:
    """The unsplit model's per-microbatch losses and summed gradients under bf16 autocast, the loss
    inside it (the usual loop)."""
    losses = []
    for a, b in zip(x.chunk(n_mb), y.chunk(n_mb)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(a), b)
        (loss / n_mb).backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _frozen_stage(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    torch.manual_seed(0)
    par = pp.parallelize(_frozen_front(GPT(**MODEL)), (x[:2],), n_microbatches=4, loss_fn=lm_loss,
                         schedule="1F1B", precision="bf16-mixed", split_policy=_cut(2))
    mb: list = []
    par.step(x, target=y, losses=mb)
    return {"losses": [l.item() for l in mb],
            "grads": {n: p.grad.clone() for n, p in par.named_parameters() if p.grad is not None},
            "frozen_grads": [n for n, p in par.named_parameters() if not p.requires_grad and p.grad is not None]}


def _two_rank_cases(rank: int, world: int) -> dict:
    """The 2-rank cases that complete, in one run (each run costs a fork)."""
    return {"frozen": _frozen_stage(rank, world), "autocast": _loss_under_autocast(rank, world)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_two_rank_cases, 2, timeout_s=300)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(**MODEL)


def _one_rank_cases(rank: int, world: int) -> dict:
    """The 1-rank cases in one run; the GPT cases share one trace (tracing dominates them)."""
    out = {"dict": _dict_loss(rank, world), **{("detached", leaf): _detached_loss(rank, world, leaf)
                                               for leaf in (False, True)}}
    if importlib.util.find_spec("transformers") is not None:   # else its test skips
        out["llama"] = _meta_llama_in_bf16(rank, world)
    return out


@pytest.fixture(scope="module")
def one_rank() -> dict:
    return run_ranks(_one_rank_cases, 1, timeout_s=200)[0]


def test_bf16_mixed_trains_a_stage_whose_parameters_are_all_frozen(two_ranks):
    """bf16-mixed crashed in its weight-copy set-up ("Tensor list must have at least one tensor") on a
    stage with no trainable matrix: frozen layers in fine-tuning, a stage of norms only."""
    got = [r["frozen"] for r in two_ranks]
    x, y = _batch()
    torch.manual_seed(0)
    want_losses, want_grads = _unsplit_bf16_mixed(_frozen_front(GPT(**MODEL)), x, y, 4)
    last = next(r for r in got if r["losses"])
    torch.testing.assert_close(torch.tensor(last["losses"]), torch.tensor(want_losses), rtol=2e-2, atol=2e-2)
    grads = {n: g for r in got for n, g in r["grads"].items()}
    assert sorted(grads) == sorted(want_grads)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=5e-2, atol=5e-3, msg=n)
    assert all(not r["frozen_grads"] for r in got)


def plain_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy as users write it: no cast of its own (autocast runs it in float32)."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def _loss_under_autocast(rank: int, world: int) -> list[float]:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    torch.manual_seed(0)
    par = pp.parallelize(GPT(**MODEL), (x[:2],), n_microbatches=4, loss_fn=plain_ce, schedule="GPipe",
                         precision="bf16-mixed", split_policy=_cut(2))
    mb: list = []
    par.step(x, target=y, losses=mb)
    return [l.item() for l in mb]


def test_bf16_mixed_loss_runs_under_the_forwards_autocast_as_in_the_unsplit_loop(two_ranks):
    """The loss ran outside autocast: a loss_fn that autocast would run in float32 met bfloat16 logits
    and computed in bfloat16, about 1% off the unsplit `with autocast: loss = loss_fn(model(x), y)`."""
    got = next(r["autocast"] for r in two_ranks if r["autocast"])
    x, y = _batch()
    torch.manual_seed(0)
    want, _ = _unsplit_bf16_mixed(GPT(**MODEL), x, y, 4, plain_ce)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=2e-3)


def _tied_bf16(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    torch.manual_seed(0)
    weights = GPT(**MODEL, tie_weights=True).state_dict()
    with torch.device("meta"):   # as pp.run builds it: traced in float32 on meta, each stage cast after
        model = GPT(**MODEL, tie_weights=True)
    par = pp.parallelize(model, (x[:2],), n_microbatches=4, loss_fn=lm_loss, schedule="1F1B", precision="bf16",
                         state_dict=weights, split_policy=_cut(3))
    mb: list = []
    par.step(x, target=y, losses=mb)
    grads = {n: p.grad.float() for n, p in par.named_parameters() if p.grad is not None}
    return {"losses": [l.float().item() for l in mb], "grads": grads,
            "dtypes": sorted({str(p.grad.dtype) for p in par.parameters() if p.grad is not None})}


def test_tied_weights_in_pure_bf16_on_three_ranks_get_the_unsplit_gradient():
    """Tied embedding and head under train.precision bf16 on 3 ranks: the middle rank, which holds no
    copy, sent float32 zeros to the ends' bfloat16 gradients (a size mismatch in the all-reduce)."""
    got = run_ranks(_tied_bf16, 3, timeout_s=300)
    x, y = _batch()
    torch.manual_seed(0)
    model = GPT(**MODEL, tie_weights=True).to(torch.bfloat16)
    for a, b in zip(x.chunk(4), y.chunk(4)):
        (lm_loss(model(a), b) / 4).backward()
    want = model.tok_emb.weight.grad.float()
    tied = [r["grads"][n] for r in got for n in r["grads"] if n in ("tok_emb.weight", "lm_head.weight")]
    assert len(tied) == 2      # one copy on the first rank, one on the last
    for g in tied:
        torch.testing.assert_close(g, want, rtol=5e-2, atol=2e-3)
    assert all(r["dtypes"] == ["torch.bfloat16"] for r in got if r["dtypes"])


def _dict_loss(rank: int, world: int) -> str:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    par = pp.parallelize(fresh_pipe("gpt", _model, (x[:2],), 1), (x[:2],), n_microbatches=2, schedule="GPipe",
                         loss_fn=lambda out, t: {"lm": lm_loss(out, t), "z": out.float().logsumexp(-1).mean()})
    try:
        par.step(x, target=y)
    except TypeError as e:
        return str(e)
    return "" if par.has_last_stage else "not last"


def test_a_loss_fn_returning_several_losses_is_refused_in_one_sentence(one_rank):
    got = one_rank["dict"]
    assert "loss_fn must return a single-element tensor" in got and "dict" in got


def test_a_loss_fn_returning_several_losses_on_two_ranks_raises_on_the_last_and_stops_the_other():
    with pytest.raises(RankError, match="loss_fn must return a single-element tensor"):
        run_ranks(_dict_loss_raising, 2, timeout_s=120)


def _dict_loss_raising(rank: int, world: int) -> None:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    par = pp.parallelize(GPT(**MODEL), (x[:2],), n_microbatches=2, schedule="1F1B", split_policy=_cut(2),
                         loss_fn=lambda out, t: (lm_loss(out, t), F.mse_loss(out, out)))
    par.step(x, target=y)


def _detached_loss(rank: int, world: int, leaf: bool = False) -> str:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    cut = ((lambda out, t: lm_loss(out, t).detach().requires_grad_()) if leaf else   # a leaf: no grad_fn
           (lambda out, t: torch.tensor(lm_loss(out, t).item())))   # the graph cut
    par = pp.parallelize(fresh_pipe("gpt", _model, (x[:2],), 1), (x[:2],), n_microbatches=2, schedule="GPipe",
                         loss_fn=cut)
    try:
        par.step(x, target=y)
    except RuntimeError as e:
        return str(e)
    return "trained"


@pytest.mark.parametrize("leaf", [False, True], ids=["no-grad", "detached-leaf"])
def test_a_loss_fn_that_cuts_the_graph_is_named_not_torchs_bare_backward_error(one_rank, leaf):
    got = one_rank["detached", leaf]   # a leaf trained nothing without a word
    assert "loss_fn returned a loss that does not require grad" in got, got


HF_LLAMA = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=16, use_cache=False)


def _logits_loss(out, t: torch.Tensor) -> torch.Tensor:
    out = out["logits"] if isinstance(out, dict) else (out[0] if isinstance(out, tuple) else out)
    return F.cross_entropy(out.float().flatten(0, 1), t.flatten())


def _meta_llama_in_bf16(rank: int, world: int) -> tuple[list, list]:
    import copy

    import pp
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    real = LlamaForCausalLM(LlamaConfig(**HF_LLAMA))
    meta = copy.deepcopy(real)   # parameters on meta, buffers (the rotary table) real
    for m in meta.modules():
        for n, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[n] = torch.nn.Parameter(p.to("meta"))
    x = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    par = pp.parallelize(meta, (x[:2],), n_microbatches=2, loss_fn=_logits_loss, precision="bf16",
                         state_dict=real.state_dict(), schedule="GPipe")
    losses: list = []
    par.step(x, target=x, losses=losses)
    unsplit = real.to(torch.bfloat16)
    return [v.item() for v in losses], [_logits_loss(unsplit(c).logits, c).item() for c in x.chunk(2)]


def test_a_meta_device_hf_llama_in_pure_bf16_is_traced_in_bf16_and_matches_the_unsplit_bf16_model(one_rank):
    """Traced in float32 and cast after, the rotary table's `.to(x.dtype)` stayed float32 in the graph:
    attention got float32 queries and bfloat16 values (a crash at the first forward)."""
    pytest.importorskip("transformers")
    got, want = one_rank["llama"]
    assert got == want


def _pure_bf16(rank: int, world: int, schedule: str) -> list[str]:
    """The parameters whose gradient is not the unsplit bfloat16 model's bit for bit (the reference made in
    the rank's own process: CPU bfloat16 kernels round alike only under the same thread count)."""
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    model = _model().to(torch.bfloat16)
    for a, b in zip(x.chunk(2), y.chunk(2)):
        (lm_loss(model(a), b) / 2).backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    par = pp.parallelize(_model(), (x[:4],), n_microbatches=2, loss_fn=lm_loss, schedule=schedule,
                         precision="bf16", split_policy=_cut(2 if schedule == "1F1B" else 4))
    par.step(x, target=y)
    return [n for n, p in par.named_parameters() if not torch.equal(p.grad, want[n])]


@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_pure_bf16_gradients_are_the_unsplit_models_bit_for_bit_under_the_zero_bubble_split(schedule):
    """The zero-bubble W added a linear weight's gradient into a bfloat16 `.grad` inside the product
    (one rounding) where autograd rounds the product and then adds: 2e-4 off under ZB schedules only."""
    assert run_ranks(_pure_bf16, 2, schedule, timeout_s=300) == [[], []]


def _uncast_bf16_mixed(rank: int, world: int) -> list[str]:
    """Parameters whose bf16-mixed gradient at pp 2 with `cast_activations = False` is not the unsplit
    autocast model's bit for bit (the reference made in the rank's own process)."""
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    ref = _model()
    for a, b in zip(x.chunk(2), y.chunk(2)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(ref(a), b) / 2
        loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    par = pp.parallelize(_model(), (x[:4],), n_microbatches=2, loss_fn=lm_loss, schedule="1F1B",
                         precision="bf16-mixed", split_policy=_cut(2))
    for s in par.stages:
        s.cast_activations = False
    par.step(x, target=y)
    return [n for n, p in par.named_parameters() if not torch.equal(p.grad, want[n])]


def test_bf16_mixed_stages_sending_activations_as_computed_equal_the_unsplit_autocast_model():
    """By default activations cross in bfloat16, which rounds the float32 residual stream at the cut
    (documented); sent as computed, the float32 gradients are the unsplit `with autocast:` model's."""
    assert run_ranks(_uncast_bf16_mixed, 2, timeout_s=300) == [[], []]
