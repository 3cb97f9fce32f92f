"""Buffers of a meta-device model that no checkpoint holds: a Hugging Face Llama's rotary frequencies
(`inv_freq`, non-persistent) are computed by its constructor. Built with its parameters alone on the meta
device (accelerate's `init_empty_weights()` idiom) and filled from a state dict, it must train exactly as
the unsplit model (the state dict has no `inv_freq`: it was refused, and an init function overwrote it
without a word). Built wholly on meta, the missing buffer is refused by name; an init function that fills
it is warned about."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from pp.parallel.meta import fill, materialize  # noqa: E402
from pp.testing import run_ranks  # noqa: E402

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=32, rope_theta=10000.0, tie_word_embeddings=False)


def _loss(out, y):
    logits = out if isinstance(out, torch.Tensor) else out[0]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _reference():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
    model.config.use_cache = False
    return model


def _batch():
    tokens = torch.randint(0, CFG["vocab_size"], (4, 9), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def _parameters_on_meta(model: nn.Module) -> nn.Module:
    """What `accelerate.init_empty_weights()` builds: parameters on meta, buffers real."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = nn.Parameter(p.to("meta"), p.requires_grad)
    return model


def _train_from_state_dict(rank: int, world: int, schedule: str) -> dict:
    import pp

    warnings.simplefilter("ignore")
    whole = _reference()
    x, y = _batch()
    model = _parameters_on_meta(transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)))
    model.config.use_cache = False
    par = pp.parallelize(model, (x[:1],), n_microbatches=4, loss_fn=_loss, state_dict=whole.state_dict(),
                         schedule=schedule)
    losses: list = []
    par.step(x, target=y, losses=losses)
    return {"losses": [l.item() for l in losses],
            "grads": {n: par.full_tensor(n, p.grad) for n, p in par.named_parameters()}}


@pytest.mark.parametrize("schedule", ["1F1B", "ZBVZeroBubble"])
def test_parameters_on_meta_keep_the_models_buffers_and_train_like_the_unsplit_model(schedule):
    results = run_ranks(_train_from_state_dict, 2, schedule, timeout_s=300)
    ref = _reference()
    x, y = _batch()
    want = [_loss(ref(xm).logits, ym) for xm, ym in zip(x.chunk(4), y.chunk(4))]
    torch.stack(want).mean().backward()
    got = [l for r in results for l in r["losses"]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor([w.item() for w in want]), rtol=1e-5, atol=1e-6)
    seen = set()
    for r in results:
        for n, g in r["grads"].items():
            torch.testing.assert_close(g, ref.get_parameter(n).grad, rtol=1e-4, atol=1e-6, msg=n)
            seen.add(n)
    assert seen == {n for n, _ in ref.named_parameters()}


def _meta_stage() -> nn.Module:
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
    materialize(model, torch.device("cpu"))
    return model


def test_a_non_persistent_buffer_built_on_meta_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'model.rotary_emb.inv_freq' is a non-persistent buffer .*"
                                        r"accelerate.init_empty_weights"):
        fill(_meta_stage(), state_dict=_reference().state_dict())


def test_an_init_fn_filling_a_non_persistent_buffer_is_warned_about_and_state_dict_entries_win():
    want = _reference()
    model = _meta_stage()
    calls = []

    def init_fn(name, t):
        calls.append(name)
        t.copy_(want.get_buffer(name))

    with pytest.warns(UserWarning, match=r"init_fn filled the non-persistent buffer\(s\) 'model.rotary_emb.inv_freq'"):
        fill(model, init_fn, state_dict=want.state_dict())
    # the state dict fills everything else
    assert calls == [n for n, _ in want.named_buffers() if n not in want.state_dict()] and calls
    for name, t in want.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name


def test_a_real_tensor_keeps_its_values_and_a_missing_parameter_is_still_refused():
    model = _parameters_on_meta(_reference())
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    made: dict = {}
    materialize(model, torch.device("cpu"), made)
    fill(model, lambda name, t: t.fill_(1.0), fresh={id(t) for t in made.values()})
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)
    assert bool((model.lm_head.weight == 1).all())
    partial = {k: v for k, v in _reference().state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(KeyError, match="state_dict has no entry 'lm_head.weight'"):
        fill(_parameters_on_meta(_reference()), state_dict=partial, fresh=set())


class _Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 8)
        self.register_buffer("shift", torch.linspace(-1, 1, 8), persistent=False)

    def forward(self, x):
        h = self.bn(self.a(x)) + self.shift
        import pp

        pp.pipe_split()
        return self.b(h)


def _normed(rank: int, world: int) -> dict:
    import pp

    torch.manual_seed(0)
    whole = _Normed()
    with torch.no_grad():
        whole.bn.running_mean.fill_(0.5)      # a pretrained model's statistics, held by the state dict
    model = _parameters_on_meta(_Normed())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    par = pp.parallelize(model, (x[:2],), n_microbatches=4, loss_fn=nn.functional.mse_loss,
                         state_dict=whole.state_dict())
    par.step(x, target=y)
    return {"state": {k: v.clone() for k, v in par.state_dict().items()},
            "grads": {n: p.grad.clone() for n, p in par.named_parameters()}}


def test_real_buffers_used_with_activations_trace_with_meta_parameters():
    """A batch norm's statistics and a non-persistent buffer added to the activations: the trace mixed the
    meta activations with the real buffers (FakeTensorDeviceMismatchError: meta and cpu, found by the
    fresh-user check); the model is traced as a copy wholly on meta and the buffers fill it."""
    torch.manual_seed(0)
    ref = _Normed()
    with torch.no_grad():
        ref.bn.running_mean.fill_(0.5)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    torch.stack([nn.functional.mse_loss(ref(a), b) for a, b in zip(x.chunk(4), y.chunk(4))]).mean().backward()
    want = ref.state_dict()
    for part in run_ranks(_normed, 2, timeout_s=120):
        for name, t in part["state"].items():
            torch.testing.assert_close(t, want[name], msg=name)
        for name, g in part["grads"].items():
            torch.testing.assert_close(g, ref.get_parameter(name).grad, msg=name)


def _whole_model_on_meta(rank: int, world: int) -> str:
    import pp

    warnings.simplefilter("ignore")
    whole = _reference().state_dict()
    with torch.device("meta"):   # buffers too: the rotary table has no values anywhere
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG))
    x = torch.randint(0, CFG["vocab_size"], (4, 8), generator=torch.Generator().manual_seed(1))
    try:
        pp.parallelize(model, (x[:2],), n_microbatches=2, loss_fn=lambda out, t: out["logits"].sum(), pp=world,
                       state_dict=whole)
    except ValueError as e:
        return str(e)
    return "built"


def test_a_whole_meta_model_whose_constructor_computed_buffer_no_state_dict_holds_is_refused_by_every_rank():
    """Found only by the rank whose stage holds the rotary table: the other rank waited for it forever."""
    got = run_ranks(_whole_model_on_meta, 2, timeout_s=120)
    assert all("'model.rotary_emb.inv_freq' is a non-persistent buffer" in r for r in got), got
