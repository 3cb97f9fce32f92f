"""`pp.parallelize` follows the model's train/eval mode: `model.eval()` / `model.train()` on the module
given to it take effect at the next step or eval (they were ignored: a model switched to eval kept batch
statistics and dropout on, and `from_pretrained`'s eval-mode model trained in eval mode after
`model.train()`). Right values from the unsplit model, per microbatch, in the same mode."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from pp.testing import run_ranks

N_MB = 2


class Net(nn.Module):
    """Batch norm makes the mode visible without randomness: batch statistics in train mode (and running
    statistics updated), running statistics in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.inp(x))))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g) * 3 + 1, torch.randn(8, 3, generator=g)


def _model(eval_mode: bool) -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.norm.running_mean.fill_(0.5)
        net.norm.running_var.fill_(2.0)
    return net.eval() if eval_mode else net


def _unsplit(net: Net, x, y, training: bool) -> list[float]:
    net = copy.deepcopy(net).train(training)
    return [F.mse_loss(net(a), b).item() for a, b in zip(x.chunk(N_MB), y.chunk(N_MB))]


def _run(rank: int, world: int, start_eval: bool) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _data()
    net = _model(start_eval)
    par = pp.parallelize(net, (x[:4],), n_microbatches=N_MB, loss_fn=F.mse_loss, schedule="1F1B",
                         split_spec={"norm": pp.SplitPoint.BEGINNING})
    out: dict = {"modes": {}}
    for mode in ("as given", "train", "eval"):
        if mode == "train":
            net.train()
        elif mode == "eval":
            net.eval()
        mb: list = []
        par.step(x, target=y, losses=mb)   # no optimizer step: only the mode changes the losses
        out[mode] = [l.item() for l in mb]
        out["modes"][mode] = [st.submod.training for st in par.stages]
    out["eval"] = par.eval(x)   # every rank calls it; the last gets the outputs
    # the running statistics the train-mode steps left (the norm is on the last stage)
    out["stats"] = {n: b.clone() for st in par.stages for n, b in st.submod.named_buffers() if "running" in n}
    return out


def _check(start_eval: bool) -> None:
    first, last = run_ranks(_run, 2, start_eval, timeout_s=300)
    x, y = _data()
    net = _model(start_eval)
    close = dict(rtol=1e-5, atol=1e-6)    # eval and train differ by far more (checked below)
    torch.testing.assert_close(last["as given"], _unsplit(net, x, y, training=not start_eval), **close)
    torch.testing.assert_close(last["train"], _unsplit(net, x, y, training=True), **close)
    other = _unsplit(net, x, y, training=False)
    assert max(abs(a - b) for a, b in zip(last["train"], other)) > 1e-2
    # eval outputs: the unsplit model in eval mode with the running statistics the steps above left
    # (batch statistics, as in train mode, would give other values)
    assert set(last["stats"]) == {"norm.running_mean", "norm.running_var"}
    assert not torch.allclose(last["stats"]["norm.running_var"], net.norm.running_var)   # the train step moved them
    ref = copy.deepcopy(net)
    ref.load_state_dict(last["stats"], strict=False)
    with torch.no_grad():
        torch.testing.assert_close(last["eval"], ref.eval()(x), **close)
        assert not torch.allclose(last["eval"], ref.train()(x), atol=1e-3)
    for r in (first, last):
        assert r["modes"] == {"as given": [not start_eval], "train": [True], "eval": [False]}


def test_model_eval_and_train_after_parallelize_switch_the_stages():
    _check(start_eval=False)


def test_a_model_given_in_eval_mode_trains_in_train_mode_after_model_train():
    """`from_pretrained` returns the model in eval mode; `model.train()` after parallelize trained it in
    eval mode without a word (the stages had been traced in eval mode)."""
    _check(start_eval=True)


def _eval_outputs(rank: int, world: int) -> torch.Tensor | None:
    import pp

    warnings.simplefilter("ignore")
    x, _ = _data()
    net = _model(False)
    par = pp.parallelize(net, (x[:4],), n_microbatches=N_MB, loss_fn=F.mse_loss, schedule="GPipe",
                         split_spec={"norm": pp.SplitPoint.BEGINNING})
    net.eval()
    return par.eval(x)


def test_par_eval_after_model_eval_gives_the_unsplit_eval_outputs():
    got = run_ranks(_eval_outputs, 2, timeout_s=300)[1]
    x, _ = _data()
    with torch.no_grad():
        want = _model(False).eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_batch_norm_in_train_mode_is_named_when_traced():
    """Batch norm is the one layer whose microbatched step differs from the whole batch's (its
    statistics are the microbatch's): losses differed from the unsplit model's without a word."""
    import pytest

    import pp

    with pytest.warns(UserWarning, match=r"Net has batch norm in train mode \(norm\): each microbatch is "
                                         r"normalised with its own statistics"):
        pp.pipeline(_model(False), (torch.randn(4, 6),))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pp.pipeline(_model(True), (torch.randn(4, 6),))    # eval mode: running statistics, nothing to say


def _frozen_norm(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _data()
    net = _model(False)
    net.norm.eval()       # frozen batch norm, set before parallelize: traced so, and kept
    par = pp.parallelize(net, (x[:4],), n_microbatches=N_MB, loss_fn=F.mse_loss, schedule="1F1B",
                         split_spec={"norm": pp.SplitPoint.BEGINNING})
    out: dict = {}
    for step in range(2):
        net.train()
        net.norm.eval()   # the usual loop re-freezes it each epoch: the same mix as traced
        mb: list = []
        par.step(x, target=y, losses=mb)
        out[step] = [l.item() for l in mb]
    net.out.eval()        # one more submodule switched after parallelize: no graph runs that mix
    try:
        par.step(x, target=y)
    except ValueError as e:
        out["error"] = str(e)
    return out


def test_submodule_modes_set_before_parallelize_are_kept_and_one_switched_after_is_refused():
    """A submodule switched to eval after parallelize (the frozen-batch-norm pattern) ran in its traced
    mode without a word; now the modes traced are kept and another mix is one ValueError."""
    first, last = run_ranks(_frozen_norm, 2, timeout_s=300)
    x, y = _data()
    net = _model(False)
    net.norm.eval()
    want = [F.mse_loss(net(a), b).item() for a, b in zip(x.chunk(N_MB), y.chunk(N_MB))]
    torch.testing.assert_close(last[0], want, rtol=1e-5, atol=1e-6)
    assert last[1] == last[0]
    for r in (first, last):
        assert "submodule 'out' of the model is in eval mode, but pp.parallelize traced it in train mode" in r["error"]
