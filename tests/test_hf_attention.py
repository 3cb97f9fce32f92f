"""transformers models (attention implementation sdpa) are traced with the attention their eager forward
runs: no mask tensor and is_causal / enable_gqa where eager skips the mask, transformers' mask where it
does not (sliding window, packed position_ids, padding). Stages equal the unsplit model at the traced
shape and at others, and tracing leaves the model and transformers as they were."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import pp  # noqa: E402

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class LM(nn.Module):
    """input_ids (and optionally position_ids / attention_mask) -> logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, ids, pos=None, mask=None):
        kw = {}
        if pos is not None:
            kw["position_ids"] = pos
        if mask is not None:
            kw["attention_mask"] = mask
        out = self.m(input_ids=ids, **kw)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _model(kind: str) -> LM:
    torch.manual_seed(0)
    small = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**small, num_key_value_heads=2, use_cache=False)
        m = transformers.LlamaForCausalLM(cfg)
    elif kind == "mistral":   # a window shorter than the sequences: the mask is not the causal one
        cfg = transformers.MistralConfig(**small, num_key_value_heads=2, sliding_window=4, use_cache=False)
        m = transformers.MistralForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False)
        m = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.BertConfig(**small)
        m = transformers.BertModel(cfg, add_pooling_layer=False)
    cfg._attn_implementation = "sdpa"
    return LM(m).eval()


def _cut(kind: str) -> str:
    return {"gpt2": "m.transformer.h.1", "bert": "m.encoder.layer.1"}.get(kind, "m.model.layers.1")


def _attention_nodes(pipe) -> list:
    return [n for i in range(pipe.num_stages) for n in pipe.get_stage_module(i).graph.nodes
            if n.op == "call_function" and n.target is SDPA]


def _mask_of(node):
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")


def _run_pipe(pipe, *args):
    return pipe(*args)[0]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_sdpa_models_trace_without_a_mask_and_equal_the_unsplit_model_at_other_shapes(kind):
    model = _model(kind)
    ids = torch.randint(0, 96, (2, 12))
    pipe = pp.pipeline(model, (ids,), split_spec={_cut(kind): pp.SplitPoint.BEGINNING})
    nodes = _attention_nodes(pipe)
    assert nodes and all(_mask_of(n) is None for n in nodes)
    if kind == "llama":   # causal and grouped-query, as the eager forward calls it
        assert all(n.args[5] is True and n.kwargs.get("enable_gqa") for n in nodes)
    assert model.m.config._attn_implementation == "sdpa"
    for shape in [(2, 12), (3, 7), (1, 20)]:
        x = torch.randint(0, 96, shape)
        torch.testing.assert_close(_run_pipe(pipe, x), model(x), rtol=1e-5, atol=1e-5)


def test_gradients_through_the_stages_equal_the_unsplit_model():
    model = _model("llama").train()
    ids, tgt = torch.randint(0, 96, (2, 12)), torch.randint(0, 96, (2, 9))
    pipe = pp.pipeline(model, (ids,), split_spec={_cut("llama"): pp.SplitPoint.BEGINNING})
    x = torch.randint(0, 96, (2, 9))
    nn.functional.cross_entropy(model(x).flatten(0, 1), tgt.flatten()).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(_run_pipe(pipe, x).flatten(0, 1), tgt.flatten()).backward()
    got = {n: p.grad for i in range(pipe.num_stages) for n, p in pipe.get_stage_module(i).named_parameters()}
    assert set(got) == set(want)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6)


def test_a_sliding_window_keeps_its_mask_and_stays_exact_past_the_window():
    model = _model("mistral")
    ids = torch.randint(0, 96, (2, 12))
    pipe = pp.pipeline(model, (ids,), split_spec={_cut("mistral"): pp.SplitPoint.BEGINNING})
    assert all(_mask_of(n) is not None for n in _attention_nodes(pipe))
    for shape in [(2, 12), (2, 3), (1, 17)]:
        x = torch.randint(0, 96, shape)
        torch.testing.assert_close(_run_pipe(pipe, x), model(x), rtol=1e-5, atol=1e-5)


def test_packed_position_ids_and_a_padding_mask_keep_transformers_masks():
    model = _model("llama")
    ids = torch.randint(0, 96, (2, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12).contiguous()   # two sequences per row
    pipe = pp.pipeline(model, (ids, pos), split_spec={_cut("llama"): pp.SplitPoint.BEGINNING})
    assert all(_mask_of(n) is not None for n in _attention_nodes(pipe))
    torch.testing.assert_close(_run_pipe(pipe, ids, pos), model(ids, pos), rtol=1e-5, atol=1e-5)
    plain = torch.arange(12).expand(2, 12).contiguous()
    torch.testing.assert_close(_run_pipe(pipe, ids, plain), model(ids, plain), rtol=1e-5, atol=1e-5)

    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, 8:] = 0
    pipe = pp.pipeline(model, (ids, None, pad), split_spec={_cut("llama"): pp.SplitPoint.BEGINNING})
    assert all(_mask_of(n) is not None for n in _attention_nodes(pipe))
    got, want = _run_pipe(pipe, ids, None, pad), model(ids, None, pad)
    torch.testing.assert_close(got[:, :8], want[:, :8], rtol=1e-5, atol=1e-5)


def test_tracing_leaves_transformers_as_it_was():
    from transformers import masking_utils

    before = masking_utils.find_packed_sequence_indices
    model = _model("llama")
    pp.pipeline(model, (torch.randint(0, 96, (2, 8)),), split_spec={_cut("llama"): pp.SplitPoint.BEGINNING})
    assert masking_utils.find_packed_sequence_indices is before
    assert model.m.config._attn_implementation == "sdpa"
    assert not model.m._forward_pre_hooks and not model.m.model._forward_pre_hooks
    assert not model.m._forward_hooks and not model.m.model._forward_hooks


def test_a_causal_mask_with_more_keys_than_queries_is_left_to_transformers():
    from transformers import masking_utils

    from pp.stage.hf_attention import _sdpa_mask_as_eager

    common = dict(batch_size=1, q_offset=0, kv_offset=0, mask_function=masking_utils.causal_mask_function,
                  attention_mask=None, allow_is_causal_skip=True, dtype=torch.float32, device=torch.device("cpu"))
    assert _sdpa_mask_as_eager(q_length=4, kv_length=4, **common) is None
    for offset in (0, 3):   # an empty cache (transformers may skip the mask itself) and a filled one
        mine = _sdpa_mask_as_eager(q_length=2, kv_length=4, **{**common, "q_offset": offset})
        theirs = masking_utils.sdpa_mask(q_length=2, kv_length=4, **{**common, "q_offset": offset})
        assert (mine is None) == (theirs is None)
        if theirs is not None:
            assert torch.equal(mine, theirs)
    filled = _sdpa_mask_as_eager(q_length=2, kv_length=4, **{**common, "q_offset": 3})
    assert filled is not None and filled.shape[-2:] == (2, 4)
