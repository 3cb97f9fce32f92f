"""`pp.losses.chunked_cross_entropy` (pp.run's language-model loss): the plain float32 cross-entropy's
value and gradients, with only one chunk's float32 intermediates saved for backward; through a pipeline
under every kind of backward (1F1B, the I/W split of ZBVZeroBubble, with and without activation
checkpointing) it trains like the unsplit model with the plain loss."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F

from pp.launcher.models import GPT
from pp.losses import chunked_cross_entropy
from pp.testing import run_ranks
from pipes import fresh_pipe

MODEL = dict(vocab_size=48, d_model=16, n_layers=4, n_heads=2, seq_len=8)
N_MB = 4
SMALL = 5 * MODEL["vocab_size"]  # 5 rows per chunk: 16 rows per microbatch make 4 chunks, the last short


def _plain(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7 * 48, 10**9])
def test_equals_plain_cross_entropy_with_ignored_targets(dtype, chunk):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 11, 48, generator=g).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 48, (3, 11), generator=g)
    targets[0, :4] = -100
    got = chunked_cross_entropy(logits, targets, chunk_elements=chunk)
    (grad_got,) = torch.autograd.grad(got, logits)
    want = _plain(logits, targets)
    (grad_want,) = torch.autograd.grad(want, logits)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)


def test_saves_no_float32_copy_of_the_logits_for_backward():
    """What autograd keeps between forward and backward: the plain loss keeps a float32 log-softmax of every
    logit (4 bytes each); the chunked one only its inputs (views of the logits the stage holds anyway)."""
    logits = torch.randn(64, 128, 256, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 256, (64, 128))

    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        for t in (logits, targets):
            seen.pop(t.untyped_storage().data_ptr(), None)
        return sum(seen.values())

    plain = saved_bytes(lambda: _plain(logits, targets))
    chunked = saved_bytes(lambda: chunked_cross_entropy(logits, targets, chunk_elements=1 << 18))
    assert plain >= 4 * logits.numel()
    assert chunked <= 1024, f"the chunked loss saved {chunked} bytes besides the logits and targets"


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_chunk_size_is_refused(bad):
    with pytest.raises(ValueError, match="chunk_elements must be a positive integer"):
        chunked_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), chunk_elements=bad)


@pytest.mark.parametrize("logits", [torch.randn(11), torch.randn(()), torch.ones(2, 5, dtype=torch.long)])
def test_logits_without_a_class_dimension_or_not_floating_point_are_refused(logits):
    targets = torch.zeros(logits.shape[:-1], dtype=torch.long) if logits.dim() else torch.tensor(0)
    with pytest.raises(ValueError, match="logits must be floating point with a batch and a class dimension"):
        chunked_cross_entropy(logits, targets)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"need targets of shape \(2, 3\), got \(2, 4\)"):
        chunked_cross_entropy(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def _batch():
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, MODEL["vocab_size"], (N_MB * 2, MODEL["seq_len"] + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(**MODEL)


def _pipelined(rank: int, world: int) -> dict:
    import pp

    warnings.simplefilter("ignore")
    x, y = _batch()
    mb = (x[:2],)
    loss_fn = functools.partial(chunked_cross_entropy, chunk_elements=SMALL)
    out = {}
    for schedule, n_stages in (("1F1B", 2), ("ZBVZeroBubble", 4)):
        for ac in ("none", "full"):
            pipe = fresh_pipe("gpt", _model, mb, n_stages)
            par = pp.parallelize(pipe, mb, n_microbatches=N_MB, loss_fn=loss_fn, schedule=schedule,
                                 activation_checkpointing=ac)
            losses: list = []
            par.step(x, target=y, losses=losses)
            out[(schedule, ac)] = {"losses": [l.item() for l in losses],
                                   "grads": {n: p.grad.clone() for n, p in par.named_parameters()}}
    return out


def test_pipeline_with_the_chunked_loss_equals_the_unsplit_model():
    results = run_ranks(_pipelined, 2, timeout_s=300)
    model = _model()
    x, y = _batch()
    want_losses = []
    for xc, yc in zip(x.tensor_split(N_MB), y.tensor_split(N_MB)):
        loss = _plain(model(xc), yc)
        (loss / N_MB).backward()
        want_losses.append(loss.item())
    want_grads = {n: p.grad for n, p in model.named_parameters()}
    for key in results[0]:
        losses = [l for r in results for l in r[key]["losses"]]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), msg=lambda m: f"{key}: {m}")
        grads = {n: g for r in results for n, g in r[key]["grads"].items()}
        assert grads.keys() == want_grads.keys(), key
        for n, g in grads.items():
            torch.testing.assert_close(g, want_grads[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key} {n}: {m}")
