"""`pp.parallelize(..., args_chunk_spec=, kwargs_chunk_spec=, output_merge_spec=)`, as torch's schedules
take them: an input every microbatch takes whole (a bias of batch 1), an input split along another
dimension, and outputs merged along it. Right values from the unsplit model."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from pp.microbatch import TensorChunkSpec, _Replicate
from pp.testing import run_ranks


class Shifted(nn.Module):
    """x (B, 6) plus a shared bias (1, 6), through two blocks; the output batch-second (6, B)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(6, 6) for _ in range(4)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = x + bias
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h.t().contiguous()


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=g), torch.randn(1, 6, generator=g), torch.randn(8, 6, generator=g)


def transposed_mse(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The batch-second output (6, b) against a batch-first target (b, 6)."""
    return F.mse_loss(out.t(), t)


def _run(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, bias, y = _data()
    torch.manual_seed(0)
    par = pp.parallelize(Shifted(), (x[:2],), {"bias": bias}, n_microbatches=4, loss_fn=transposed_mse,
                         kwargs_chunk_spec={"bias": _Replicate}, output_merge_spec=TensorChunkSpec(1),
                         split_spec={"layers.2": pp.SplitPoint.BEGINNING})
    par.step(x, bias=bias, target=y)
    out = par.eval(x, bias=bias)
    return {"grads": {n: p.grad for n, p in par.named_parameters()}, "out": out}


def test_a_replicated_kwarg_and_a_merge_dim_give_the_unsplit_model():
    """Without the specs the bias of batch 1 cannot be split into 4 microbatches, and the outputs
    would be merged along dim 0 (24 x 2, not 6 x 8)."""
    got = run_ranks(_run, 2, timeout_s=300)
    x, bias, y = _data()
    torch.manual_seed(0)
    model = Shifted()
    want_out = model(x, bias)
    transposed_mse(want_out, y).backward()
    grads = {n: g for r in got for n, g in r["grads"].items()}
    assert sorted(grads) == sorted(n for n, _ in model.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    out = next(r["out"] for r in got if r["out"] is not None)
    assert out.shape == (6, 8)
    torch.testing.assert_close(out, want_out.detach())


def _bad_merge(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, bias, y = _data()
    par = pp.parallelize(Shifted(), (x[:2],), {"bias": bias}, n_microbatches=4, loss_fn=transposed_mse,
                         kwargs_chunk_spec={"bias": _Replicate}, output_merge_spec=TensorChunkSpec(7),
                         split_spec={"layers.2": pp.SplitPoint.BEGINNING})
    try:
        par.eval(x, bias=bias)
        return {"error": None}
    except (ValueError, RuntimeError) as e:
        return {"error": f"{type(e).__name__}: {e}",
                "grads": [n for n, p in par.named_parameters() if p.grad is not None]}


def test_a_merge_dim_the_output_lacks_is_refused_on_every_rank_before_anything_runs():
    """TensorChunkSpec(7) for a 2-dim output: an IndexError from torch.cat on the last rank alone, after
    the forward (and, from step(), the backward) had run; now one sentence before any rank sends."""
    got = run_ranks(_bad_merge, 2, timeout_s=300)
    last = got[-1]["error"]
    assert last == ("ValueError: output_merge_spec merges output along dim 7, but it has 2 dimensions "
                    "(shape (6, *))"), last
    assert got[0]["error"].startswith("RuntimeError: pipeline step aborted: rank 1 refused the step")
    assert all(r["grads"] == [] for r in got)
