"""`python -m pp.export`: a pp checkpoint out as safetensors. For hf: models transformers'
`from_pretrained` loads it and gives the logits of pp's stages (tied and untied, whole and sharded);
for other models `load_state_dict` takes the file; bad inputs are one line and exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import pp
from pp.export import ExportError, export
from pp.launcher import checkpoint as ckpt
from pp.launcher.config import load_config
from pp.launcher.models import build_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16)
GPT2 = dict(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def saved_run(tmp_path, model: dict):
    """A run directory holding a pp checkpoint (step 3) of `model` built from its config, and the model."""
    (tmp_path / "cfg.yaml").write_text(f"model: {json.dumps(model)}\n")
    cfg = load_config(str(tmp_path / "cfg.yaml"))
    net = build_model(cfg.model, seed=7)
    with torch.no_grad():       # weights no init would give, so that a load that skipped one shows
        for p in net.parameters():
            p.add_(torch.rand_like(p))
    run = tmp_path / "run"
    ckpt.save(str(run / "checkpoints"), 3, {"model": net.state_dict()}, {"model": cfg.to_dict()["model"]})
    return run, net


def pipeline_logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    pipe = pp.pipeline(net, (x,), split_policy=pp.split_by_cost(2))
    with torch.no_grad():
        return pipe(x)[0]


def test_untied_llama_export_loads_with_from_pretrained_and_gives_the_stages_logits(tmp_path):
    run, net = saved_run(tmp_path, {"name": "hf:LlamaForCausalLM", "config": LLAMA})
    out = tmp_path / "hf"
    assert export(str(run), str(out)) == str(run / "checkpoints" / "step-3")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.dtype == torch.float32
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, pipeline_logits(net, x), rtol=0, atol=0)


def test_tied_gpt2_export_sharded_from_the_command_line_stores_the_embedding_once(tmp_path):
    run, net = saved_run(tmp_path, {"name": "hf:GPT2LMHeadModel", "config": GPT2})
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "pp.export", str(run), "-o", str(out), "--max-shard-size", "40KB"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and files <= set(os.listdir(out))
    assert "transformer.wte.weight" in index["weight_map"] and "lm_head.weight" not in index["weight_map"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, pipeline_logits(net, x), rtol=0, atol=0)


def test_built_in_model_exports_a_state_dict_that_load_state_dict_takes(tmp_path):
    run, net = saved_run(tmp_path, {"name": "gpt", "vocab_size": 256, "d_model": 16, "n_layers": 2,
                                    "n_heads": 2, "seq_len": 8})
    before = sorted(os.listdir(run / "checkpoints" / "step-3"))
    export(str(run / "checkpoints" / "step-3"), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]
    from pp.export import main   # an output under a file: one line, exit 2 (was a NotADirectoryError traceback)

    under_file = str(tmp_path / "out" / "model.safetensors" / "again")
    assert main([str(run), "-o", under_file]) == 2
    with pytest.raises(ckpt.CheckpointError, match=r"step-3x does not exist \(there: step-3"):   # a mistyped step
        export(str(run / "checkpoints" / "step-3x"), str(tmp_path / "out2"))
    for inside in (run / "checkpoints" / "step-3", run / "checkpoints"):   # was written into the checkpoint
        with pytest.raises(ExportError, match="lies in the checkpoint"):
            export(str(run), str(inside))
    assert sorted(os.listdir(run / "checkpoints" / "step-3")) == before
    fresh = build_model(load_config(str(tmp_path / "cfg.yaml")).model, seed=1)
    fresh.load_state_dict(safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors")))
    for k, v in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nothing", "-o", "{tmp}/out"], "checkpoint path {tmp}/nothing does not exist"),
    (["{tmp}/step-99", "-o", "{tmp}/out"], "checkpoint path {tmp}/step-99 does not exist"),   # not "damaged"
    (["{tmp}", "-o", "{tmp}/out"], "no complete checkpoint at {tmp}"),
    (["{tmp}", "-o", "{tmp}/out", "--max-shard-size", "lots"], "--max-shard-size 'lots': expected a positive size"),
], ids=["missing", "missing-step", "no-checkpoint", "shard-size"])
def test_bad_export_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, message):
    from pp.export import main

    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pp.export: ") and message.format(tmp=tmp_path) in err[0], err
