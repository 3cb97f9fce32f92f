"""A model given to `pp.parallelize` in eval mode (as `from_pretrained` returns it) and trained without
`model.train()`: it trains as the unsplit model in eval mode does (dropout off), on its eval-mode graph,
which runs without the activation checkpointing set up on the training graph: one warning says so and
names model.train(); none once the model is in train mode."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from pp.testing import run_ranks


class DropoutMLP(nn.Module):
    def __init__(self, dropout_layers: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3 if i < dropout_layers else 0.0))
                                    for i in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)


def _run(rank: int, world: int, dropout_layers: int = 4) -> dict:
    import pp

    x, y = _data()
    torch.manual_seed(0)
    model = DropoutMLP(dropout_layers).eval()
    par = pp.parallelize(model, (x[:2],), n_microbatches=4, loss_fn=F.mse_loss, activation_checkpointing="full",
                         split_spec={"layers.2": pp.SplitPoint.BEGINNING})
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        par.step(x, target=y)
        par.step(x, target=y)
    grads = {n: p.grad.clone() for n, p in par.named_parameters()}
    model.train()
    with warnings.catch_warnings(record=True) as trained:
        warnings.simplefilter("always")
        par.step(x, target=y)
    return {"first": [str(w.message) for w in first if "eval mode" in str(w.message)],
            "trained": [str(w.message) for w in trained if "eval mode" in str(w.message)], "grads": grads}


def test_training_in_eval_mode_matches_unsplit_eval_and_warns_once():
    got = run_ranks(_run, 2, timeout_s=300)
    x, y = _data()
    torch.manual_seed(0)
    model = DropoutMLP().eval()
    for _ in range(2):
        F.mse_loss(model(x), y).backward()
    grads = {n: g for r in got for n, g in r["grads"].items()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    for r in got:
        assert len(r["first"]) == 1, r["first"]
        assert "activation checkpointing ('full')" in r["first"][0] and "model.train()" in r["first"][0]
        assert r["trained"] == []


def test_a_stage_without_dropout_keeps_its_training_graph():
    """Dropout only in stage 0's layers: stage 1's eval-mode trace differs from its training trace only
    in the names tracing gave its values (its input was `getitem`, then `clone`), so it keeps the training
    graph with its activation checkpointing, and only stage 0's rank warns."""
    got = run_ranks(_run, 2, 2, timeout_s=300)
    assert len(got[0]["first"]) == 1 and "stage(s) [0]" in got[0]["first"][0]
    assert got[1]["first"] == []
