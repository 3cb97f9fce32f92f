"""A model given `labels=` computes its own loss (Hugging Face's `out.loss`): each microbatch's mean over
its counted labels, which pp cannot see. Where ignored labels (-100) fall unevenly over the microbatches,
weighting the microbatches by rows is not the unsplit model's token mean (transformers#34191): pp cannot
be right there, so it says so once, and stays quiet where the labels fall evenly or the loss scales
itself (scale_grads=False). The gradient that differs comes from the unsplit model."""
from __future__ import annotations

import warnings

import pytest
import torch

from pp.testing import run_ranks

pytest.importorskip("transformers")

CFG = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=2, max_position_embeddings=16, use_cache=False)


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG))


def _batch(uneven: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 32, (4, 8), generator=g)
    y = x.clone()
    if uneven:   # prompt-masked fine-tuning rows: 1, 4, 7 and 7 labels counted after the shift
        y[0, 2:] = -100
        y[1, 5:] = -100
    return x, y


def _own_loss(out, t):
    return out["loss"] if isinstance(out, dict) else out[0]


def _body(rank: int, world: int) -> dict:
    import pp

    got = {}
    x, y = _batch(True)
    pipe = pp.pipeline(_model(), mb_args=(x[:1],), mb_kwargs={"labels": y[:1]},
                       split_spec={"model.layers.1": pp.SplitPoint.BEGINNING})
    stage = pipe.build_stage(rank, torch.device("cpu"))
    for case, uneven, scale_grads in (("uneven", True, True), ("even", False, True), ("self-scaled", True, False)):
        x, y = _batch(uneven)
        sched = pp.Schedule1F1B(stage, 4, loss_fn=_own_loss, scale_grads=scale_grads)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):   # said once, not per step
                stage.submod.zero_grad()
                sched.step(x, labels=y) if rank == 0 else sched.step(target=y)
        got[case] = [str(w.message) for w in caught if "labels=" in str(w.message)]
        if case == "uneven" and rank == 0:
            got["grads"] = {n: p.grad.clone() for n, p in stage.submod.named_parameters()}
    return got


def test_unevenly_ignored_labels_of_a_models_own_loss_are_named():
    first, last = run_ranks(_body, 2)
    assert last == {"uneven": [], "even": [], "self-scaled": []}   # the first stage's rank sees labels=
    assert len(first["uneven"]) == 1 and "1, 4, 7, 7" in first["uneven"][0], first["uneven"]
    assert first["even"] == [] and first["self-scaled"] == []
    # the warning names a real fault: the row-weighted gradient is not the unsplit model's
    x, y = _batch(True)
    model = _model()
    model(x, labels=y).loss.backward()
    want = dict(model.named_parameters())
    diffs = [(first["grads"][n] - want[n].grad).abs().max().item() for n in first["grads"]]
    assert max(diffs) > 1e-3, diffs


def test_labels_ignored_where_the_shift_drops_them_anyway_are_not_named():
    """-100 in the first column only: a causal LM's shift drops that column, so every microbatch counts
    the same labels (the warning was false); uneven after the shift still warns."""
    from pp.schedules.loss_weights import warn_labels_mean

    y = torch.arange(32).view(4, 8)
    y[0, 0] = y[1, 0] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_labels_mean([{"labels": r} for r in y.chunk(4)]) is False
    y[0, 5:] = -100
    with pytest.warns(UserWarning, match="fall unevenly"):
        assert warn_labels_mean([{"labels": r} for r in y.chunk(4)]) is True


def _items_in_batch(rank: int, world: int) -> dict:
    """docs/splitter.md's recipe for a model's own loss: `num_items_in_batch` (the batch's counted labels,
    a 0-dim tensor given whole to every microbatch) with scale_grads=False makes each microbatch's loss its
    sum over the batch's count, so the step's gradient is the unsplit model's token mean."""
    import pp
    from pp.microbatch import _Replicate

    x, y = _batch(True)
    n = (y[:, 1:] != -100).sum()
    pipe = pp.pipeline(_model(), mb_args=(x[:1],), mb_kwargs={"labels": y[:1], "num_items_in_batch": n},
                       split_spec={"model.layers.1": pp.SplitPoint.BEGINNING})
    stage = pipe.build_stage(rank, torch.device("cpu"))
    sched = pp.Schedule1F1B(stage, 4, loss_fn=_own_loss, scale_grads=False,
                            kwargs_chunk_spec={"labels": None, "num_items_in_batch": _Replicate})
    losses: list = []
    if rank == 0:
        sched.step(x, labels=y, num_items_in_batch=n)
    else:
        sched.step(target=y, losses=losses)
    return {"losses": [float(v) for v in losses],
            "grads": {k: p.grad.clone() for k, p in stage.submod.named_parameters()}}


def test_num_items_in_batch_makes_a_models_own_loss_the_token_mean():
    first, last = run_ranks(_items_in_batch, 2)
    x, y = _batch(True)
    model = _model()
    ref = model(x, labels=y).loss
    ref.backward()
    assert abs(sum(last["losses"]) - ref.item()) < 1e-5, (last["losses"], ref.item())
    want = dict(model.named_parameters())
    for name, g in {**first["grads"], **last["grads"]}.items():
        torch.testing.assert_close(g, want[name].grad, msg=name)
