"""`pp.parallelize(..., scale_grads=False)`: docs/splitter.md's recipe for a mean over the tokens that are
not ignored (-100 targets spread unevenly over the microbatches) through the Python API, which took no
scale_grads (a TypeError; without it the recipe's gradient was 1 / n_microbatches of the right one)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from pp.launcher.models import GPT
from pp.testing import run_ranks

MODEL = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, seq_len=8)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 32, (4, 8), generator=g)
    y = torch.randint(0, 32, (4, 8), generator=g)
    y[0, 2:] = -100       # the first microbatch holds far fewer counted tokens than the second
    y[1, 5:] = -100
    return x, y


def _run(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    n = (y != -100).sum()

    def loss_fn(out, t):
        return F.cross_entropy(out.flatten(0, 1), t.flatten(), reduction="sum", ignore_index=-100) / n

    torch.manual_seed(0)
    par = pp.parallelize(GPT(**MODEL), (x[:2],), n_microbatches=2, loss_fn=loss_fn, scale_grads=False)
    par.step(x, target=y)
    return {name: p.grad for name, p in par.named_parameters()}


def test_token_mean_recipe_through_parallelize_gives_the_unsplit_gradient():
    got = {k: v for r in run_ranks(_run, 2, timeout_s=300) for k, v in r.items()}
    x, y = _batch()
    torch.manual_seed(0)
    model = GPT(**MODEL)
    F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
