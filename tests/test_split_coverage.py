"""Models the splitter must cover: a reshape that tracing turned into a view runs on inputs of other strides;
T5 (encoder-decoder, default attention) trains like the unsplit model; automatic splits of models whose
blocks sit in several containers (ResNet's layer1..layer4, an encoder's and a decoder's stacks) cut by
cost over all of them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pp
from pp.stage.segments import model_segments


class _FlattensItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x.reshape(-1, 8))   # traced on a contiguous x: the decomposed graph holds a view
        pp.pipe_split()
        return self.b(h)


def test_reshape_traced_as_a_view_runs_on_an_input_of_other_strides():
    torch.manual_seed(0)
    model = _FlattensItsInput()
    pipe = pp.pipeline(model, (torch.randn(2, 3, 8),))
    x = torch.randn(3, 2, 8).transpose(0, 1)          # same shape, not contiguous
    torch.testing.assert_close(pipe(x)[0], model(x))


class _T5LM(nn.Module):
    """T5ForConditionalGeneration mapping (input_ids, decoder_input_ids) to logits."""

    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       dropout_rate=0.0, decoder_start_token_id=0, use_cache=False)
        self.t5 = transformers.T5ForConditionalGeneration(config)

    def forward(self, input_ids, decoder_input_ids):
        return self.t5(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits


def test_t5_with_default_attention_cut_in_two_by_cost_trains_like_the_unsplit_model():
    torch.manual_seed(0)
    model = _T5LM()
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(0, 100, (2, 12), generator=g), torch.randint(0, 100, (2, 8), generator=g)
    pipe = pp.pipeline(model, (src, tgt), split_policy=pp.split_by_cost(2))
    first = {n for n, _ in pipe.get_stage_module(0).named_parameters()}
    second = {n for n, _ in pipe.get_stage_module(1).named_parameters()}
    assert any(".encoder.block." in n for n in first) and any(".decoder.block." in n for n in second)
    out = pipe(src, tgt)[0]
    ref = model(src, tgt)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    refs = torch.autograd.grad(ref.square().mean(), list(model.parameters()))
    for (name, _), got, want in zip(model.named_parameters(), grads, refs):
        torch.testing.assert_close(got, want, msg=name)


class _Block(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(c_in, c, 3, stride, 1), nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)
        self.down = nn.Sequential(nn.Conv2d(c_in, c, 1, stride), nn.BatchNorm2d(c)) if stride > 1 else None

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return torch.relu(y + (self.down(x) if self.down is not None else x))


class _TinyResNet(nn.Module):
    """ResNet's layout: a stem, four Sequential stages of blocks (widths doubling), a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.layer1 = nn.Sequential(_Block(8, 8), _Block(8, 8))
        self.layer2 = nn.Sequential(_Block(8, 16, 2), _Block(16, 16))
        self.layer3 = nn.Sequential(_Block(16, 32, 2), _Block(32, 32))
        self.layer4 = nn.Sequential(_Block(32, 64, 2), _Block(64, 64))
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("policy", ["cost", "params"])
def test_resnet_stages_are_cut_over_all_four_layer_containers(policy):
    torch.manual_seed(0)
    model = _TinyResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    segments = model_segments(model, torch.export.export(model, (x,), strict=False).graph)
    assert [s.name for s in segments] == ["<before>"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)] + ["<after>"]
    make = pp.split_by_cost if policy == "cost" else pp.split_into_equal_size
    pipe = pp.pipeline(model, (x,), split_policy=make(4))
    holders = [{n for n, _ in pipe.get_stage_module(s).named_parameters()} for s in range(4)]
    stage_of = {seg.name: 0 if seg.name == "<before>" else 3 if seg.name == "<after>" else
                next(s for s in range(4) if any(n.startswith(seg.name + ".") for n in holders[s]))
                for seg in segments}
    assert sorted(stage_of.values()) == list(stage_of.values())
    cuts = [b.name for a, b in zip(segments, segments[1:]) if stage_of[a.name] != stage_of[b.name]]
    assert len(cuts) == 3 and any(not c.startswith("layer1.") for c in cuts), cuts   # once all were in layer1
    if policy == "params":
        load = [sum(p.numel() for p in pipe.get_stage_module(s).parameters()) for s in range(4)]
        assert max(load) < 0.6 * sum(load), load   # layer4 alone holds about half the parameters
    else:
        load = [sum(seg.flops for seg in segments if stage_of[seg.name] == s) for s in range(4)]
        assert max(load) < 0.4 * sum(load), load
    torch.testing.assert_close(pipe(x)[0], model(x))


def test_hf_model_returning_its_cache_is_told_to_set_use_cache_false():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=True)
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(pp.PipelineTraceError) as err:
        pp.pipeline(model, (torch.zeros(2, 8, dtype=torch.long),), split_policy=pp.split_by_cost(2))
    message = str(err.value)
    assert "DynamicCache" in message and "set use_cache=False" in message, message
    assert "<string>" not in message and "\n" not in message
    model.config.use_cache = False   # the way out works
    assert pp.pipeline(model, (torch.zeros(2, 8, dtype=torch.long),), split_policy=pp.split_by_cost(2)).num_stages == 2
