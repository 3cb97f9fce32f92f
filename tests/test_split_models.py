"""What the splitter must handle, one model each: keyword and default inputs, buffers across cuts,
batch norm, shared / aliased / tied parameters, skips past a neighbour, in-place ops after a cut,
conv / attention layers, structured outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pp
from models import (BATCH, D, AliasedParam, AttentionModel, BufferAcrossCut, ConvBN, InplaceAfterCut,
                    KwargsModel, LooseEnds, SharedParam, SkipPastNeighbour, StructuredIO, Transformer, build,
                    check_equivalent, example, tokens)
from pp.stage.pipe import MODEL_INPUT


def _names(pipe: pp.Pipe, s: int, what: str = "parameters") -> set[str]:
    stage = pipe.get_stage_module(s)
    return {n for n, _ in getattr(stage, f"named_{what}")(remove_duplicate=False)}


# ------------------------------------------------------------------------------------ keyword inputs

def test_keyword_inputs_traced_as_keywords_may_be_passed_by_keyword_or_position():
    model = build(KwargsModel)
    x, y, bias = example(BATCH, D), example(BATCH, D, seed=2), example(D, seed=3)
    pipe = check_equivalent(model, (x,), {"y": y, "bias": bias})
    expected = model(x, y, bias=bias)
    torch.testing.assert_close(pipe(x, y, bias=bias)[0], expected)
    torch.testing.assert_close(pipe(x=x, y=y, bias=bias)[0], expected)


def test_omitted_arguments_take_their_defaults_as_when_traced():
    model = build(KwargsModel)
    x = example(BATCH, D)
    pipe = check_equivalent(model, (x,))
    torch.testing.assert_close(pipe(x, scale=2.0)[0], model(x))  # passing the default itself is fine
    shift = example(D, seed=4)
    traced_with_shift = pp.pipeline(model, (x,), {"shift": shift})
    torch.testing.assert_close(traced_with_shift(x, shift=shift)[0], model(x, shift=shift))
    torch.testing.assert_close(traced_with_shift(x, shift=2 * shift)[0], model(x, shift=2 * shift))


def test_non_tensor_input_other_than_traced_is_a_clear_error():
    model = build(KwargsModel)
    x = example(BATCH, D)
    pipe = pp.pipeline(model, (x,), {"scale": 3.0})
    torch.testing.assert_close(pipe(x, scale=3.0)[0], model(x, scale=3.0))
    with pytest.raises(ValueError, match=r"traced with 3\.0.*fixed at trace time"):
        pipe(x, scale=5.0)
    untraced = pp.pipeline(model, (x,))
    with pytest.raises(ValueError, match=r"'scale'.*default 2\.0"):
        untraced(x, scale=5.0)
    with pytest.raises(ValueError, match=r"'y'"):
        untraced(x, example(BATCH, D))  # y was None when traced: the graph has no input for it
    with pytest.raises(ValueError, match=r"'shift'"):
        untraced(x, shift=torch.ones(D))  # the default tensor is baked into the graph


# ------------------------------------------------------------------------------------------- buffers

def test_buffers_read_and_updated_across_a_cut_equal_unsplit_after_two_calls():
    pipe = check_equivalent(build(BufferAcrossCut), (example(BATCH, D),), calls=2)
    # calls is updated in stage 0; stage 1 receives its new value as an activation, not the buffer.
    assert {"offset", "calls", "ema"} <= set(pipe.get_stage_module(0).state_dict())
    assert {"offset", "ema"} <= set(pipe.get_stage_module(1).state_dict())
    assert "calls" not in pipe.get_stage_module(1).state_dict()
    # A non-persistent buffer stays out of the state dicts, as in the model.
    assert "scratch" in _names(pipe, 1, "buffers")
    assert all("scratch" not in pipe.get_stage_module(s).state_dict() for s in range(2))
    assert pipe.get_stage_module(0).get_buffer("calls").item() == 2


def test_batch_norm_running_stats_after_train_forward_equal_unsplit():
    model = build(ConvBN).train()
    pipe = check_equivalent(model, (example(2, 3, 5, 5),), calls=2)
    assert pipe.num_stages == 2
    assert {"bn0.running_mean", "bn0.running_var", "bn0.num_batches_tracked"} <= set(
        pipe.get_stage_module(0).state_dict())
    assert "bn1.running_mean" in pipe.get_stage_module(1).state_dict()
    assert model.bn0.num_batches_tracked.item() == 2
    assert not torch.equal(model.bn1.running_mean, torch.zeros(4))


def test_batch_norm_in_eval_mode_uses_and_keeps_running_stats():
    model = build(ConvBN)
    model(example(2, 3, 5, 5, seed=7))  # non-trivial running stats
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_equivalent(model, (example(2, 3, 5, 5),))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


# ----------------------------------------------------------------------------- shared and tied params

def test_parameter_used_by_two_stages_appears_in_each_under_its_name():
    pipe = check_equivalent(build(SharedParam), (example(BATCH, D),))
    assert pipe.num_stages == 3
    assert "w" in _names(pipe, 0) and "w" in _names(pipe, 2) and "w" not in _names(pipe, 1)
    assert pipe.info().shared_params == {"w": [0, 2]}


def test_parameter_aliased_under_two_names_is_registered_under_both():
    model = build(AliasedParam)
    pipe = check_equivalent(model, (example(BATCH, D),))
    for s in (0, 2):
        stage = pipe.get_stage_module(s)
        assert stage.get_parameter("a") is stage.get_parameter("b") is model.a
        assert {"a", "b"} <= set(stage.state_dict())
    assert pipe.info().shared_params == {"a": [0, 2]}


def test_tied_embedding_and_lm_head_share_one_parameter_across_stages():
    idx = tokens()
    model = build(Transformer, tie_weights=True)

    def loss(outputs):
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        return F.cross_entropy(logits.flatten(0, 1), idx.flatten())

    pipe = check_equivalent(model, (idx,), split_policy=pp.split_into_equal_size(3), loss_fn=loss)
    last = pipe.num_stages - 1
    assert {"tok.weight", "head.weight"} <= _names(pipe, 0) & _names(pipe, last)
    assert pipe.info().shared_params == {"tok.weight": [0, last]}
    head = pipe.get_stage_module(last).get_parameter("head.weight")
    assert head is pipe.get_stage_module(0).get_parameter("tok.weight") is model.tok.weight


# --------------------------------------------------------------------------------- values across cuts

def test_value_from_stage_0_consumed_in_stage_2_is_wired_past_stage_1():
    x, y = example(BATCH, D), example(BATCH, D, seed=2)
    pipe = check_equivalent(build(SkipPastNeighbour), (x, y))
    io = pipe.info().stage_io
    assert pipe.num_stages == 3
    assert io[0].input_sources == [(MODEL_INPUT, 0), (MODEL_INPUT, 1)]
    assert io[1].input_sources == [(0, i) for i, c in enumerate(io[0].output_consumers) if (1, 0) in c]
    from_stage_0 = [src for src in io[2].input_sources if src[0] == 0]
    assert len(from_stage_0) == 2  # the skip value and the model input y, which stage 0 forwards
    assert io[0].consumers == [1, 2] and io[1].consumers == [2]
    assert io[2].producers == [0, 1] and io[1].producers == [0]
    for s, stage_io in enumerate(io):  # both directions of the wiring agree
        for out, consumers in enumerate(stage_io.output_consumers):
            for c, slot in consumers:
                assert io[c].input_sources[slot] == (s, out)
    # Stage 1 never sees the skip value or y: its only input is stage 0's h.
    assert len(io[1].input_sources) == 1
    assert pipe.info().edges == {0: [1, 2], 1: [2], 2: []}


def test_in_place_ops_on_a_tensor_right_after_the_cut_equal_unsplit():
    model = build(InplaceAfterCut)
    x = example(BATCH, D)
    pipe = check_equivalent(model, (x,))
    assert pipe.num_stages == 3
    # Stage 0's output must not be changed by stage 1's in-place ops.
    out0 = pipe.get_stage_module(0)(x)
    kept = [t.clone() for t in out0]
    pipe.get_stage_module(1)(*[out0[i] for _, i in pipe.info().stage_io[1].input_sources])
    for a, b in zip(out0, kept):
        assert torch.equal(a, b)


def test_dict_output_with_tuple_none_int_and_model_input_comes_back_as_one_tuple():
    x = example(BATCH, D)
    model = build(StructuredIO)
    pipe = check_equivalent(model, (x,))
    assert pipe.num_stages == 3
    (out,) = pipe(x)
    assert list(out) == ["out", "pair", "none", "width", "input"]
    assert isinstance(out["pair"], tuple) and out["none"] is None and out["width"] == D // 2
    torch.testing.assert_close(out["input"], x)


def test_tuple_output_comes_back_as_a_tuple():
    pipe = check_equivalent(build(InplaceAfterCut), (example(BATCH, D),))
    out = pipe(example(BATCH, D))
    assert isinstance(out, tuple) and len(out) == 2


def test_unused_parameters_and_buffers_land_in_one_stage_and_constants_in_each_reader():
    model = build(LooseEnds)
    pipe = check_equivalent(model, (example(BATCH, D), torch.arange(BATCH)))
    together = set()
    for s in range(pipe.num_stages):
        keys = set(pipe.get_stage_module(s).state_dict())
        assert not keys & together, f"stage {s} repeats {keys & together}"
        together |= keys
    assert together == set(model.state_dict())  # the stages together hold the whole model
    assert {"unused.weight", "unused.bias"} <= set(pipe.get_stage_module(0).state_dict())
    for s in range(2):  # the plain tensor attribute is a non-persistent copy in each stage that reads it
        assert any(n.endswith("mask") for n, _ in pipe.get_stage_module(s).named_buffers())
    last = pipe.get_stage_module(1).get_buffer("last")
    assert last is model.last and last.abs().sum() > 0


# -------------------------------------------------------------------------------------------- layers

def test_conv_and_batch_norm_layers_equal_unsplit():
    check_equivalent(build(ConvBN), (example(2, 3, 6, 6),))


def test_linear_layer_norm_and_sdpa_attention_equal_unsplit():
    pipe = check_equivalent(build(AttentionModel), (example(BATCH, 5, D),))
    assert pipe.num_stages == 2
    assert "attn.qkv.weight" in _names(pipe, 0) and "ln_out.weight" in _names(pipe, 1)
