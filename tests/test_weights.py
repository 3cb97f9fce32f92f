"""`pp.weights.load_weights` (model.init_from) and `ParallelModel.load_state_dict`: every file format fills
the model exactly, a tied tensor stored once fills every alias, and a bad source is one error listing
every offending key, raised on every rank before any weight is copied."""
from __future__ import annotations

import os

import pytest
import torch

import pp
from pp.launcher.models import GPT
from pp.launcher.train import lm_loss
from pp.testing import run_ranks
from pp.weights import WeightSource, WeightsError, load_weights, open_weights

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)
GPT2 = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0)


def _llama(seed: int):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_sharded_and_single_safetensors_and_torch_save_files_fill_the_model_exactly(tmp_path):
    saved = _llama(0)
    saved.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    saved.save_pretrained(tmp_path / "single")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.save(saved.state_dict(), tmp_path / "weights.pt")
    for path in (tmp_path / "sharded", tmp_path / "single", tmp_path / "single" / "model.safetensors",
                 tmp_path / "weights.pt"):
        fresh = _llama(1)
        load_weights(fresh, str(path))
        _same_weights(fresh, saved)
    assert open_weights(str(tmp_path / "sharded")).config_path.endswith("config.json")


def test_a_weights_file_never_runs_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": object()}, path)   # a pickled object, refused by weights_only
    with pytest.raises(WeightsError, match="weights_only") as err:
        open_weights(str(path))
    assert "set to `False`" not in str(err.value) and "\n" not in str(err.value)   # no advice to turn it off
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(WeightsError, match="neither a .safetensors file nor a state dict") as err:
        open_weights(str(tmp_path / "noise.pt"))
    assert "set to `False`" not in str(err.value) and "\n" not in str(err.value)


def test_gpt2_checkpoint_stores_the_tied_embedding_once_and_it_fills_the_lm_head_too(tmp_path):
    torch.manual_seed(0)
    saved = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    saved.save_pretrained(tmp_path)
    assert "lm_head.weight" not in open_weights(str(tmp_path)).shapes
    torch.manual_seed(1)
    fresh = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    load_weights(fresh, str(tmp_path))
    _same_weights(fresh, saved)
    assert fresh.lm_head.weight is fresh.transformer.wte.weight


def test_weights_of_an_untied_model_are_refused_by_a_model_that_ties_them():
    # model.init_from once took the untied checkpoint's embedding and dropped its lm_head without a word
    # (load_unsplit refused the same pair); equal values under both names still load
    untied, tied = GPT(256, 16, 2, 2, 16), GPT(256, 16, 2, 2, 16, tie_weights=True)
    before = tied.tok_emb.weight.detach().clone()
    with pytest.raises(WeightsError, match="different tensors under 'tok_emb.weight' and 'lm_head.weight'"):
        load_weights(tied, untied.state_dict())
    assert torch.equal(tied.tok_emb.weight, before)   # nothing copied
    same = {**untied.state_dict(), "lm_head.weight": untied.tok_emb.weight.detach().clone()}
    load_weights(tied, same)
    assert torch.equal(tied.lm_head.weight, untied.tok_emb.weight) and tied.lm_head.weight is tied.tok_emb.weight


def test_keys_of_the_base_model_load_into_the_model_with_a_head(tmp_path):
    saved = _llama(0)
    base = {k[len("model."):]: v for k, v in saved.state_dict().items() if k.startswith("model.")}
    base["lm_head.weight"] = saved.lm_head.weight.detach()
    fresh = _llama(1)
    load_weights(fresh, base, base_prefix="model")
    _same_weights(fresh, saved)


def test_missing_unexpected_and_misshaped_keys_are_one_error_and_nothing_is_copied():
    model, before = _llama(0), _llama(0).state_dict()
    state = {k: torch.zeros_like(v) for k, v in _llama(1).state_dict().items()}
    del state["lm_head.weight"]
    state["model.extra.weight"] = torch.zeros(3)
    state["model.norm.weight"] = torch.zeros(7)
    with pytest.raises(WeightsError) as err:
        load_weights(model, state)
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 missing: lm_head.weight" in msg and "1 unexpected: model.extra.weight" in msg
    assert "1 mis-shaped: model.norm.weight is (7,) there but (32,) in the model" in msg
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_pp_checkpoint_run_directory_fills_the_model(tmp_path):
    from pp.launcher import checkpoint as ckpt

    saved = _llama(0)
    ckpt.save(str(tmp_path / "run" / "checkpoints"), 5, {"model": saved.state_dict()}, {})
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-5"):
        fresh = _llama(1)
        load_weights(fresh, str(path))
        _same_weights(fresh, saved)
    # a newer damaged checkpoint is passed over, and the source says so (it was passed over silently)
    ckpt.save(str(tmp_path / "run" / "checkpoints"), 9, {"model": _llama(2).state_dict()}, {})
    os.remove(tmp_path / "run" / "checkpoints" / "step-9" / ".metadata")
    source = open_weights(str(tmp_path / "run"))
    assert source.what == (f"pp checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-5'} (checkpoint "
                           f"{tmp_path / 'run' / 'checkpoints' / 'step-9'} is damaged (file .metadata is missing); "
                           f"skipping it)")
    fresh = _llama(1)
    load_weights(fresh, source)
    _same_weights(fresh, saved)


def test_a_path_that_holds_no_weights_says_what_was_expected(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        open_weights(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"holds no weights pp can read: expected \*\.safetensors"):
        open_weights(str(tmp_path / "empty"))


# ------------------------------------------------------------- ParallelModel.load_state_dict, 2 ranks

MODEL = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=4, seq_len=8, tie_weights=True)


def _gpt(seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(**MODEL)


def _load_cases(rank: int, world: int) -> dict:
    model = pp.parallelize(_gpt(0), (torch.zeros(2, 8, dtype=torch.long),), n_microbatches=2, loss_fn=lm_loss,
                           device="cpu", split_spec={"blocks.1": pp.SplitPoint.BEGINNING})
    mine = model.state_dict()
    errors = []
    # bad for stage 1 only (a block-1 weight of the wrong shape, one unknown key): both ranks refuse
    bad = {k: torch.full_like(v, 7.0) for k, v in _gpt(1).state_dict().items()}
    bad["blocks.1.mlp.fc.weight"] = torch.zeros(3, 3)
    bad["blocks.9.attn.qkv.weight"] = torch.zeros(3)
    try:
        model.load_state_dict(bad)
    except ValueError as e:
        errors.append(str(e))
    unchanged = all(torch.equal(t, model.state_dict()[k]) for k, t in mine.items())
    # the tied embedding given once (as a checkpoint without the LM head's alias would hold it); each
    # rank reads only the tensors of its own stage
    good = _gpt(1).state_dict()
    del good["lm_head.weight"]
    asked: list[str] = []
    source = WeightSource("recording", {k: tuple(v.shape) for k, v in good.items()},
                          lambda keys: asked.extend(keys) or {k: good[k] for k in keys})
    load_weights(model, source)
    now = model.state_dict()
    loaded = all(torch.equal(now[k], good[k]) for k in now if k != "lm_head.weight")
    return {"errors": errors, "unchanged": unchanged, "loaded": loaded, "asked": sorted(set(asked)),
            "head_tied": "lm_head.weight" not in now or torch.equal(now["lm_head.weight"], good["tok_emb.weight"])}


def test_parallel_load_state_dict_checks_on_every_rank_before_copying_and_takes_a_tied_tensor_once():
    results = run_ranks(_load_cases, 2, timeout_s=120)
    for r in results:
        assert len(r["errors"]) == 1, r
        assert "1 unexpected: blocks.9.attn.qkv.weight" in r["errors"][0]
        assert "blocks.1.mlp.fc.weight is (3, 3) there but (64, 16) in the model" in r["errors"][0]
        assert r["unchanged"] and r["loaded"] and r["head_tied"], r
    rank0, rank1 = (set(r["asked"]) for r in results)
    assert not rank0 & {n for n in rank1 if n.startswith("blocks.1.")} and "blocks.1.mlp.fc.weight" in rank1
    assert "blocks.0.mlp.fc.weight" in rank0 and not any(n.startswith("blocks.1.") for n in rank0)
