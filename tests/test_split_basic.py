"""The splitter on the seed models: cuts by pipe_split(), by split_spec and by policy give stages that
together equal the unsplit model (outputs and gradients), keep the model's names, and are deterministic."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import pp
from models import (BATCH, D, ExampleCode, MLPStack, MLPWithSplit, MultiMLP, Transformer, build,
                    check_equivalent, example, tokens)


def _stage_param_names(pipe: pp.Pipe, s: int) -> set[str]:
    return {n for n, _ in pipe.get_stage_module(s).named_parameters()}


def test_mlp_with_one_pipe_split_equals_unsplit_in_two_stages():
    pipe = check_equivalent(build(MLPWithSplit), (example(BATCH, D),))
    assert pipe.num_stages == 2
    assert _stage_param_names(pipe, 0) == {"mlp0.fc.weight", "mlp0.fc.bias", "mlp0.proj.weight", "mlp0.proj.bias"}
    assert _stage_param_names(pipe, 1) == {"mlp1.fc.weight", "mlp1.fc.bias", "mlp1.proj.weight", "mlp1.proj.bias"}


def test_example_code_with_three_pipe_splits_and_a_skip_equals_unsplit_in_four_stages():
    x, y = example(BATCH, D), example(BATCH, D, seed=2)
    pipe = check_equivalent(build(ExampleCode), (x, y))
    assert pipe.num_stages == 4
    assert _stage_param_names(pipe, 0) == {"mm_param0"}
    assert _stage_param_names(pipe, 1) == {"mm_param1", "lin0.weight", "lin0.bias"}
    assert _stage_param_names(pipe, 2) == {"mm_param2"}
    assert _stage_param_names(pipe, 3) == {"lin1.weight", "lin1.bias"}
    assert "cval" in pipe.get_stage_module(0).state_dict()


def test_multi_mlp_with_a_pipe_split_per_layer_gives_one_stage_per_layer():
    pipe = check_equivalent(build(MultiMLP, n=4), (example(BATCH, D),))
    assert pipe.num_stages == 4
    for s in range(4):
        assert {n.split(".")[1] for n in _stage_param_names(pipe, s)} == {str(s)}


def test_split_spec_beginning_cuts_before_the_named_modules():
    spec = {"layers.1": pp.SplitPoint.BEGINNING, "layers.3": pp.SplitPoint.BEGINNING}
    pipe = check_equivalent(build(MLPStack), (example(BATCH, D),), split_spec=spec)
    assert pipe.num_stages == 3
    layers = [sorted({n.split(".")[1] for n in _stage_param_names(pipe, s)}) for s in range(3)]
    assert layers == [["0"], ["1", "2"], ["3"]]


def test_split_spec_end_cuts_after_the_named_modules():
    spec = {"layers.0": pp.SplitPoint.END, "layers.2": pp.SplitPoint.END}
    pipe = check_equivalent(build(MLPStack), (example(BATCH, D),), split_spec=spec)
    assert pipe.num_stages == 3
    layers = [sorted({n.split(".")[1] for n in _stage_param_names(pipe, s)}) for s in range(3)]
    assert layers == [["0"], ["1", "2"], ["3"]]


def test_split_spec_may_name_a_nested_module():
    spec = {"layers.1.proj": pp.SplitPoint.BEGINNING}
    pipe = check_equivalent(build(MLPStack), (example(BATCH, D),), split_spec=spec)
    assert pipe.num_stages == 2
    assert "layers.1.fc.weight" in _stage_param_names(pipe, 0)
    assert "layers.1.proj.weight" in _stage_param_names(pipe, 1)


def _lm_loss(idx):
    def loss(outputs):
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        return F.cross_entropy(logits.flatten(0, 1), idx.flatten())
    return loss


def test_transformer_split_by_policy_equals_unsplit():
    idx = tokens()
    for policy in (pp.split_into_equal_size(3), pp.split_by_cost(3)):
        pipe = check_equivalent(build(Transformer), (idx,), split_policy=policy, loss_fn=_lm_loss(idx))
        assert pipe.num_stages == 3
        assert "tok.weight" in _stage_param_names(pipe, 0)
        assert "head.weight" in _stage_param_names(pipe, 2)


def test_transformer_split_by_block_names_keeps_whole_blocks_together():
    idx = tokens()
    spec = {"blocks.0": pp.SplitPoint.END, "blocks.2": pp.SplitPoint.BEGINNING}
    pipe = check_equivalent(build(Transformer), (idx,), split_spec=spec, loss_fn=_lm_loss(idx))
    assert pipe.num_stages == 3
    for s in range(3):
        blocks = {n.split(".")[1] for n in _stage_param_names(pipe, s) if n.startswith("blocks.")}
        assert blocks == {str(s)}
    assert {"tok.weight", "pos.weight"} <= _stage_param_names(pipe, 0)
    assert {"ln_f.weight", "head.weight"} <= _stage_param_names(pipe, 2)


def test_stage_module_is_an_ordinary_trainable_module():
    model = build(ExampleCode)
    x = example(BATCH, D)
    pipe = pp.pipeline(model, (x,))
    stage = pipe.get_stage_module(1)
    assert isinstance(stage, nn.Module)
    assert dict(stage.named_parameters()) == {
        "mm_param1": model.mm_param1, "lin0.weight": model.lin0.weight, "lin0.bias": model.lin0.bias}
    # A loss on pipe(...) reaches the stage's parameters; an optimizer over them trains the model.
    pipe(x)[0].square().mean().backward()
    assert all(p.grad is not None for p in stage.parameters())
    before = model.lin0.weight.detach().clone()
    torch.optim.SGD(stage.parameters(), lr=0.1).step()
    assert not torch.equal(model.lin0.weight, before)
    # It can be called on its own with the inputs its StageIO names and loaded from a state dict.
    h = pipe.get_stage_module(0)(x)
    io = pipe.info().stage_io[1]
    out = stage(*[h[i] for _, i in io.input_sources])
    assert isinstance(out, tuple) and out[0].shape == (BATCH, D)
    stage.load_state_dict({k: torch.zeros_like(v) for k, v in stage.state_dict().items()})
    assert torch.count_nonzero(model.lin0.weight) == 0


def test_two_pipeline_calls_give_identical_stages_and_info():
    idx = tokens()
    model = build(Transformer, n_layers=2)
    a = pp.pipeline(model, (idx,), split_policy=pp.split_by_cost(3))
    b = pp.pipeline(model, (idx,), split_policy=pp.split_by_cost(3))
    assert a.num_stages == b.num_stages == 3
    for s in range(3):
        assert a.get_stage_module(s).code == b.get_stage_module(s).code
        assert list(a.get_stage_module(s).state_dict()) == list(b.get_stage_module(s).state_dict())
    ia, ib = a.info(), b.info()
    assert ia.stage_io == ib.stage_io
    assert ia.out_spec == ib.out_spec
    assert ia.shared_params == ib.shared_params
    assert ia.input_binder.in_spec == ib.input_binder.in_spec


def _describe_split() -> str:
    pipe = pp.pipeline(build(Transformer, n_layers=2), (tokens(),), split_policy=pp.split_by_cost(3))
    stages = [(pipe.get_stage_module(s).code, list(pipe.get_stage_module(s).state_dict()))
              for s in range(pipe.num_stages)]
    return repr((stages, pipe.info().stage_io, pipe.info().shared_params))


def test_a_process_with_another_hash_seed_gets_identical_stages():
    # Ranks are separate processes, each with its own string-hash seed: set order must not leak in.
    tests = os.path.dirname(os.path.abspath(__file__))
    script = f"import sys; sys.path.insert(0, {tests!r}); import test_split_basic as t; print(t._describe_split())"
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    here = _describe_split()
    assert "def forward" in here
    assert done.stdout.strip() == here


def test_parallelize_cuts_by_the_models_pipe_split_calls_or_by_cost_in_one_trace(monkeypatch):
    """Without split_spec or split_policy, parallelize cuts at the model's pipe_split() calls, else by cost:
    decided on one trace (it traced a model without calls twice: seconds to minutes of start-up)."""
    import pp.stage.split as split
    from pp.launcher.models import GPT
    from pp.parallel.api import _split

    traces = []
    export = split.export_model
    monkeypatch.setattr(split, "export_model", lambda *a, **k: traces.append(1) or export(*a, **k))

    class Marked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            x = self.a(x)
            pp.pipe_split()
            return self.b(x)

    gpt = GPT(vocab_size=32, d_model=16, n_layers=4, n_heads=2, seq_len=8)
    assert _split(gpt, (torch.randint(0, 32, (2, 8)),), None, 4, None, None).num_stages == 4 and len(traces) == 1
    assert _split(Marked(), (torch.randn(2, 4),), None, 2, None, None).num_stages == 2 and len(traces) == 2
