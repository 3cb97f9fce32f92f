"""`model.name: hf:<ClassName>` through `torchrun -m pp.run`: Llama and tied GPT-2 on 2 ranks train step for
step like the unsplit model, `model.init_from` starts from a save_pretrained directory (and a resumed run
ignores it), and each bad hf/init_from input ends the job with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pp import load_unsplit
from pp.launcher.config import ConfigError, load_config
from pp.launcher.data import ByteBatches, load_corpus
from pp.launcher.job import prepare
from pp.launcher.models import build_model
from pp.launcher.train import lm_loss, lr_at
from test_launcher_run import REPO, check_ok, losses, main_in_process, torchrun

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LLAMA = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16)
GPT2 = dict(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
MIXTRAL = dict(vocab_size=256, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=16,
               output_router_logits=True, router_aux_loss_coef=0.05)
STEPS = 4


def write(path, out, model: dict, *, pp: int = 2, steps: int = STEPS, lr: float = 0.01, extra: str = "") -> str:
    path.write_text(f"model: {json.dumps(model)}\n"
                    f"parallel: {{pp: {pp}, timeout_s: 120}}\n"
                    f"schedule: {{name: 1F1B, microbatches: 2}}\n"
                    f"train: {{steps: {steps}, batch_size: 4, lr: {lr}, seed: 0, warmup_steps: 0}}\n"
                    f"output: {{dir: '{out}'}}\n"
                    f"checkpoint: {{every: {steps}}}\n" + extra)
    return str(path)


def run_single(cfg: str, *overrides: str, timeout: float = 200) -> subprocess.CompletedProcess:
    """`python -m pp.run` in one process (parallel.pp 1)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "pp.run", cfg, *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    proc.log = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


def unsplit_losses(cfg_path: str, steps: int) -> list[float]:
    """The launcher's loop (AdamW groups, LR schedule, global clipping, mean over microbatches) on the
    unsplit model in this process."""
    cfg = load_config(cfg_path)
    t = cfg.train
    model = build_model(cfg.model, t.seed)
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": t.weight_decay},
                             {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.beta1, t.beta2))
    data = ByteBatches(load_corpus(t.data), t.batch_size, cfg.model.seq_len, t.seed)
    out = []
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        m = cfg.schedule.microbatches
        batch = [lm_loss(model(x), y) for x, y in zip(data.tokens(step).chunk(m), data.targets(step).chunk(m))]
        (torch.stack(batch).sum() / m).backward()
        norm = torch.stack([p.grad.norm() for _, p in named if p.grad is not None]).norm().item()
        if norm > t.grad_clip:
            for _, p in named:
                p.grad.mul_(t.grad_clip / (norm + 1e-6))
        opt.step()
        out.append(torch.stack(batch).mean().item())
    return out


@pytest.mark.parametrize("name, config, split", [
    ("hf:LlamaForCausalLM", LLAMA, "split: {points: [model.layers.2]}\n"),   # the model's own names
    ("hf:GPT2LMHeadModel", GPT2, ""),                                        # automatic, by cost
], ids=["llama-points", "gpt2-tied-auto"])
def test_hf_model_on_2_ranks_trains_step_for_step_like_the_unsplit_model(tmp_path, name, config, split):
    out = tmp_path / "out"
    cfg = write(tmp_path / "cfg.yaml", out, {"name": name, "config": config}, extra=split)
    proc = torchrun(2, cfg)
    check_ok(proc)
    assert f"pp.run: {name} with" in proc.stdout and "2 stages on 2 ranks" in proc.stdout
    got = losses(out)
    ref = unsplit_losses(cfg, STEPS)
    assert got[STEPS] < got[1] - 0.1, got
    for step, loss in enumerate(ref, 1):
        assert got[step] == pytest.approx(loss, rel=2e-4), (step, got, ref)
    model = build_model(load_config(cfg).model, 1)
    load_unsplit(model, str(out))   # one tensor per tied pair after training: the shared copies agree
    if name == "hf:GPT2LMHeadModel":
        assert model.lm_head.weight is model.transformer.wte.weight


def test_mixtral_with_router_logits_trains_on_the_load_balancing_loss_too(tmp_path):
    """output_router_logits: true (it was refused): the training loss is the next-token loss plus
    router_aux_loss_coef x the router's load-balancing loss, as transformers adds it to `out.loss`, step
    for step like the unsplit model; val_loss is the next-token loss alone."""
    out = tmp_path / "out"
    cfg = write(tmp_path / "cfg.yaml", out, {"name": "hf:MixtralForCausalLM", "config": MIXTRAL},
                extra="split: {points: [model.layers.2]}\n")
    proc = torchrun(2, cfg)
    check_ok(proc)
    got = losses(out)
    ref = unsplit_losses(cfg, STEPS)
    for step, loss in enumerate(ref, 1):
        assert got[step] == pytest.approx(loss, rel=2e-4), (step, got, ref)
    assert got[STEPS] < got[1] - 0.1, got
    # step 1 by transformers itself: its own aux_loss on each microbatch, its own coefficient
    c = load_config(cfg)
    torch.manual_seed(0)
    model = build_model(c.model, c.train.seed)
    plain = transformers.MixtralForCausalLM(model.config)
    plain.load_state_dict(model.state_dict())
    data = ByteBatches(load_corpus(c.train.data), c.train.batch_size, c.model.seq_len, c.train.seed)
    parts = []
    for x, y in zip(data.tokens(1).chunk(2), data.targets(1).chunk(2)):
        o = plain(input_ids=x)
        ce = torch.nn.functional.cross_entropy(o.logits.flatten(0, 1).float(), y.flatten())
        parts.append((ce + MIXTRAL["router_aux_loss_coef"] * o.aux_loss).item())
        assert o.aux_loss.item() > 0.5    # the aux term is not negligible in the comparison
    assert got[1] == pytest.approx(sum(parts) / 2, rel=2e-4), (got[1], parts)


def test_init_from_a_save_pretrained_directory_with_lr_0_keeps_the_weights_and_resume_ignores_it(tmp_path, capsys):
    torch.manual_seed(3)
    saved = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    saved.save_pretrained(tmp_path / "pretrained")
    out = tmp_path / "out"
    cfg = write(tmp_path / "cfg.yaml", out, {"name": "hf:LlamaForCausalLM",
                                             "init_from": str(tmp_path / "pretrained")}, pp=1, steps=1, lr=0.0)
    code, out_text, err = main_in_process(capsys, cfg)   # pp.run's main, one rank, in this process
    assert code == 0, out_text + err
    assert f"initialised the weights from safetensors in {tmp_path / 'pretrained'}" in out_text
    model = build_model(load_config(cfg).model, 1)
    load_unsplit(model, str(out))
    for k, v in saved.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # resumed from its own checkpoint: init_from (now naming other weights) is not read again
    torch.manual_seed(4)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).save_pretrained(tmp_path / "other")
    code, out_text, err = main_in_process(capsys, cfg, "--train.steps", "2", "--checkpoint.resume", "true",
                                          "--checkpoint.every", "1", "--model.init_from", str(tmp_path / "other"))
    assert code == 0, out_text + err
    assert "resumed from" in out_text and "initialised the weights" not in out_text
    load_unsplit(model, str(out))
    for k, v in saved.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_init_from_a_mixtral_directory_in_transformers_saved_layout(tmp_path, capsys):
    """transformers' save_pretrained writes Mixtral's experts as per-expert w1/w2/w3 tensors, which its
    class holds fused and converts as it loads; init_from refused such a directory ("does not fit the
    model"; found by a fresh-user check). It now loads as from_pretrained converts it."""
    config = dict(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=16)
    torch.manual_seed(3)
    saved = transformers.MixtralForCausalLM(transformers.MixtralConfig(**config))
    saved.save_pretrained(tmp_path / "pretrained")
    out = tmp_path / "out"
    cfg = write(tmp_path / "cfg.yaml", out, {"name": "hf:MixtralForCausalLM",
                                             "init_from": str(tmp_path / "pretrained")}, pp=1, steps=1, lr=0.0)
    code, out_text, err = main_in_process(capsys, cfg)   # pp.run's main, one rank, in this process
    assert code == 0, out_text + err
    assert "(as transformers' from_pretrained converts it)" in out_text, out_text
    model = build_model(load_config(cfg).model, 1)
    load_unsplit(model, str(out))
    for k, v in saved.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_init_from_weights_of_another_shape_ends_the_job_with_one_line_listing_them(tmp_path):
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "num_hidden_layers": 2})).save_pretrained(
        tmp_path / "small")
    cfg = write(tmp_path / "cfg.yaml", tmp_path / "out",
                {"name": "hf:LlamaForCausalLM", "config": LLAMA, "init_from": str(tmp_path / "small")}, pp=1)
    proc = run_single(cfg)
    assert proc.returncode == 2, proc.log[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pp.run:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "LOAD REPORT" not in proc.log, proc.log   # transformers' own table of the same keys: not shown
    assert "model.init_from=" in lines[0] and "9 missing: model.layers.2.input_layernorm.weight" in lines[0]


@pytest.mark.parametrize("model, message", [
    ({"name": "hf:LlamaForCasualLM", "config": LLAMA}, "has no model class 'LlamaForCasualLM' (did you mean 'hf:LlamaForCausalLM'?)"),
    ({"name": "hf:LlamaForCausalLM", "config": {**LLAMA, "hiden_size": 32}}, "model.config has 'hiden_size' (did you mean 'hidden_size'?)"),
    ({"name": "hf:LlamaForCausalLM", "config": "/no/such/config.json"}, "model.config='/no/such/config.json': no such file"),
    ({"name": "hf:LlamaForCausalLM"}, "needs model.config"),
    ({"name": "hf:LlamaForCausalLM", "config": LLAMA, "d_model": 32}, "unknown key model.d_model"),
    ({"name": "hf:LlamaForCausalLM", "config": {**LLAMA, "vocab_size": 100}}, "model.vocab_size=100 (from model.config): byte-level data (train.data='stdlib') needs at least 256"),
    ({"name": "hf:GPT2LMHeadModel", "config": GPT2, "seq_len": 64}, "model.seq_len=64 is longer than the 16 learned positions"),
    ({"name": "hf:BertForMaskedLM", "config": dict(vocab_size=256, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=16), "seq_len": 32}, "model.seq_len=32 is longer than the 16 learned positions"),
    ({"name": "hf:RobertaForMaskedLM", "config": dict(vocab_size=256, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=32, max_position_embeddings=18, pad_token_id=1), "seq_len": 17}, "model.seq_len=17 is longer than the 16 learned positions"),
    ({"name": "hf:LlamaForCausalLM", "config": LLAMA, "init_from": "/no/weights"}, "model.init_from='/no/weights': weights path '/no/weights' does not exist"),
    ({"name": "hf:T5ForConditionalGeneration", "config": {"vocab_size": 256, "d_model": 32, "num_layers": 1}, "seq_len": 16},
     "is an encoder-decoder model"),
    ({"name": "gpt", "config": LLAMA}, "unknown key model.config"),
    ({"name": "hf:LlamaForCausalLM", "config": {**LLAMA, "num_attention_heads": 5}},
     "model.config was rejected by LlamaConfig: "),
    ({"name": "hf:LlamaForCausalLM", "config": {**LLAMA, "rms_norm_eps": "1e-5"}},
     "(rms_norm_eps='1e-5' is text: YAML reads a number like 1e-5 as a string; write 1.0e-5)"),
    ({"name": "hf:LlamaForCausalLM", "init_from": "/no/such/dir"},
     "model.init_from='/no/such/dir' does not exist"),
    ({"name": "hf:MixtralForCausalLM", "config": {**MIXTRAL, "router_aux_loss_coef": "0.02"}},
     "(router_aux_loss_coef='0.02' is text: YAML reads a number like 1e-5 as a string"),
    ({"name": "hf:MixtralForCausalLM", "config": {**MIXTRAL, "router_aux_loss_coef": -0.01}},
     "model.config output_router_logits=True (MixtralForCausalLM) needs a router_aux_loss_coef >= 0"),
], ids=["class", "config-key", "config-path", "no-config", "section-key", "vocab", "positions", "bert-positions",
        "roberta-positions", "init-from",
        "encoder-decoder", "config-on-gpt", "config-value", "config-number-as-text", "init-from-no-config",
        "router-aux-coef", "router-aux-coef-negative"])
def test_bad_hf_input_is_one_config_error_naming_it(tmp_path, model, message):
    cfg = write(tmp_path / "cfg.yaml", tmp_path / "out", model, pp=1)
    with pytest.raises(ConfigError) as err:
        prepare(load_config(cfg), 1)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_a_non_finite_config_number_is_one_line_naming_it(tmp_path, value):
    """YAML's .nan reached transformers as {'__float__': 'NaN'} and came back as an empty message."""
    fields = ", ".join(f"{k}: {json.dumps(v)}" for k, v in MIXTRAL.items() if k != "router_aux_loss_coef")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model: {{name: 'hf:MixtralForCausalLM', config: {{{fields}, router_aux_loss_coef: {value}}}}}\n"
                   f"parallel: {{pp: 1}}\noutput: {{dir: '{tmp_path / 'out'}'}}\n")
    with pytest.raises(ConfigError) as err:
        prepare(load_config(str(cfg)), 1)
    assert str(err.value) == f"model.config router_aux_loss_coef={value[1:]}: expected a finite number", str(err.value)


def test_config_json_path_gives_the_architecture_and_sizes(tmp_path):
    transformers.GPT2Config(**GPT2).to_json_file(tmp_path / "config.json")
    cfg = load_config(write(tmp_path / "cfg.yaml", tmp_path / "out",
                            {"name": "hf:GPT2LMHeadModel", "config": str(tmp_path / "config.json")}))
    assert (cfg.model.seq_len, cfg.model.vocab_size) == (16, 256)
    assert cfg.model.config["n_layer"] == 2
    wrong = write(tmp_path / "cfg2.yaml", tmp_path / "out", {"name": "hf:LlamaForCausalLM",
                                                             "config": str(tmp_path / "config.json")})
    with pytest.raises(ConfigError, match="describes a 'gpt2' model, but hf:LlamaForCausalLM needs a 'llama' config"):
        load_config(wrong)


def test_pp_runs_its_default_job_without_transformers_or_safetensors(tmp_path):
    """Nothing on the default path imports them: they are optional (pip install 'pp[hf]')."""
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['safetensors'] = None\n"
            "import pp, pp.run, pp.weights, pp.export, pp.hf\n"
            "from pp.launcher.config import load_config\n"
            "from pp.launcher.models import build_model\n"
            "import pp.launcher.job, pp.launcher.train\n"
            "model = build_model(load_config(None, ['--model.init_from', 'x.pt']).model, 0)\n"
            "print('ok', type(model).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok GPT" in proc.stdout, proc.stderr[-3000:]


def test_init_from_inside_the_runs_own_output_dir_is_refused(tmp_path):
    """A fresh run removes the checkpoints in its output.dir before it would read them."""
    cfg = write(tmp_path / "cfg.yaml", tmp_path / "out", {"name": "gpt", "n_layers": 2,
                                                          "init_from": str(tmp_path / "out" / "checkpoints")}, pp=1)
    with pytest.raises(ConfigError, match=r"lies in output.dir=.*copy them elsewhere, or set checkpoint.resume: true"):
        prepare(load_config(cfg), 1)


def test_pure_bf16_llama_trains_with_the_unsplit_bf16_models_loss(tmp_path, capsys):
    """`train.precision: bf16` traces the model in bf16, as `model.to(torch.bfloat16)` runs unsplit: traced
    in float32, the rotary table's `.to(x.dtype)` stayed float32 and attention got float32 queries and
    bfloat16 values (a crash at step 1)."""
    out = tmp_path / "out"
    cfg = write(tmp_path / "cfg.yaml", out, {"name": "hf:LlamaForCausalLM", "config": LLAMA}, pp=1, steps=1,
                extra="")
    code, out_text, err = main_in_process(capsys, cfg, "--train.precision", "bf16")   # one rank, in this process
    assert code == 0, (out_text + err)[-2000:]
    c = load_config(cfg)
    model = build_model(c.model, c.train.seed).to(torch.bfloat16)
    data = ByteBatches(load_corpus(c.train.data), c.train.batch_size, c.model.seq_len, c.train.seed)
    m = c.schedule.microbatches
    with torch.no_grad():
        want = torch.stack([lm_loss(model(x), y) for x, y in zip(data.tokens(1).chunk(m), data.targets(1).chunk(m))])
    assert losses(out)[1] == pytest.approx(want.float().mean().item(), rel=2e-3)
