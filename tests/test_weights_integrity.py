"""What a checkpoint or a weights file means, checked before it is trained on: a resume with another
tokenizer is refused (its ids mean other tokens) and one at another precision says what changes; init_from
refuses integer or non-finite tensors for floating parameters and names a truncated torch.save file as
such; files pp writes for others to read get the mode a plain open() gives."""
from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch

import pp
from pp.launcher import checkpoint as ckpt
from pp.launcher.models import GPT
from pp.launcher.train import lm_loss, precision_change
from pp.testing import run_ranks
from pp.weights import WeightsError, WeightValuesError, load_weights, open_weights

from test_launcher_run import main_in_process, write_config

safetensors_torch = pytest.importorskip("safetensors.torch")

MODEL = {"n_layers": 2, "seq_len": 16, "vocab_size": 512}   # with write_config's d_model 32, n_heads 4


def _tokenizer(path, vocab_size: int, words: list[str]) -> str:
    """A byte-level BPE tokenizer.json trained here on `words` (no network)."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"{w} {i}\n" for i in range(100) for w in words], trainer)
    tok.save(str(path))
    return str(path)


def _run(capsys, cfg: str, *overrides: str) -> tuple[int, str, str]:
    return main_in_process(capsys, cfg, *overrides)


# ------------------------------------------------------------------------- resume: tokenizer, precision

def test_resume_refuses_another_tokenizer_naming_both_and_takes_a_moved_copy_with_a_precision_note(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"stage {i % 4} sends microbatch {i} to the pipeline\n" for i in range(400)))
    tok_a = _tokenizer(tmp_path / "a.json", 300, ["stage", "sends", "microbatch"])
    tok_b = _tokenizer(tmp_path / "b.json", 320, ["pipeline", "the", "to"])
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "out", pp=1, steps=4, every=2, model=MODEL)
    data = ("--train.data", str(corpus))

    code, out, err = _run(capsys, cfg, *data, "--train.tokenizer", tok_a)
    assert code == 0, out + err
    step4 = tmp_path / "out" / "checkpoints" / "step-4"
    manifest = ckpt.read_manifest(str(step4))
    assert manifest["tokenizer"]["path"] == os.path.abspath(tok_a) and len(manifest["tokenizer"]["sha256"]) == 64
    assert manifest["precision"] == "fp32"

    # another tokenizer: one line naming both, exit 2, nothing loaded or trained
    code, out, err = _run(capsys, cfg, *data, "--train.tokenizer", tok_b, "--checkpoint.resume", "true",
                          "--train.steps", "6")
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.startswith("pp.run:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"checkpoint {step4} was trained on the ids of train.tokenizer {os.path.abspath(tok_a)!r}" in lines[0]
    assert f"but this run reads the ids of train.tokenizer {tok_b!r}" in lines[0]
    assert "the token ids would mean other tokens" in lines[0]
    assert "resumed from" not in out and not (tmp_path / "out" / "checkpoints" / "step-6").exists()

    # the same file elsewhere is the same tokenizer; another precision is a note saying what changes
    moved = tmp_path / "moved" / "tok.json"
    moved.parent.mkdir()
    shutil.copy(tok_a, moved)
    code, out, err = _run(capsys, cfg, *data, "--train.tokenizer", str(moved), "--checkpoint.resume", "true",
                          "--train.steps", "6", "--train.precision", "bf16-mixed", "--train.activations_in_bf16",
                          "false")
    assert code == 0, out + err
    assert f"resumed from {step4}" in out
    assert "note: train.activations_in_bf16 true -> false since step 4 was saved: activations now cross stages " \
           "as computed" in out, out
    assert ckpt.read_manifest(str(tmp_path / "out" / "checkpoints" / "step-6"))["activations_in_bf16"] is False
    assert ("note: train.precision fp32 -> bf16-mixed since step 4 was saved: the float32 weights and AdamW state "
            "load exactly (bf16-mixed keeps float32 masters), and the steps after it compute in bfloat16 under "
            "autocast") in out, out
    assert ckpt.read_manifest(str(tmp_path / "out" / "checkpoints" / "step-6"))["precision"] == "bf16-mixed"

    # a manifest written before pp recorded them (no tokenizer, no precision) still resumes, silently
    step6 = tmp_path / "out" / "checkpoints" / "step-6" / "manifest.json"
    old = json.loads(step6.read_text())
    del old["tokenizer"], old["precision"]
    step6.write_text(json.dumps(old))
    code, out, err = _run(capsys, cfg, *data, "--train.tokenizer", tok_b, "--checkpoint.resume", "true",
                          "--train.steps", "8")
    assert code == 0, out + err
    assert "resumed from" in out and "train.precision" not in out


def test_a_checkpoint_with_non_finite_weights_is_refused_at_resume_naming_the_tensor(tmp_path, capsys):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "out", pp=1, steps=2, every=2, model=MODEL)
    code, out, err = _run(capsys, cfg)
    assert code == 0, out + err
    root = tmp_path / "out" / "checkpoints"
    manifest = ckpt.read_manifest(str(root / "step-2"))
    dcp_to_torch_save(str(root / "step-2"), str(tmp_path / "state.pt"))
    state = torch.load(tmp_path / "state.pt")
    state["model"]["lm_head.weight"][0, 0] = float("nan")   # as a run with train.nan_check off could save
    meta = {k: v for k, v in manifest.items() if k not in ("format", "step", "saved_at", "world_size", "files")}
    ckpt.save(str(root), 2, state, meta)
    code, out, err = _run(capsys, cfg, "--checkpoint.resume", "true", "--train.steps", "4")
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.startswith("pp.run:")]
    assert lines == [f"pp.run: checkpoint {root / 'step-2'} cannot be resumed: lm_head.weight holds 1 NaN of its "
                     f"16384 values; expected finite weights (saved from a run that diverged, or damaged)"], err


def test_tokenizer_records_compare_by_content_and_bytes_differ_from_any_tokenizer():
    a = {"path": "/x/tok.json", "sha256": "a" * 64}
    ckpt.check_same_tokenizer("ck", a, {"path": "/elsewhere/t.json", "sha256": "a" * 64})
    ckpt.check_same_tokenizer("ck", "bytes", "bytes")
    for saved, current in ((None, a), (a, None), (None, "bytes")):   # an older manifest, token files: unknown
        ckpt.check_same_tokenizer("ck", saved, current)
    with pytest.raises(ckpt.CheckpointError, match=r"^checkpoint ck was trained on byte ids \(no train.tokenizer\) "
                                                   r"but this run reads the ids of train.tokenizer '/x/tok.json' "
                                                   r"\(sha256 aaaaaaaaaaaa\)"):
        ckpt.check_same_tokenizer("ck", "bytes", a)


def test_precision_notes_say_what_happens_to_the_saved_weights_and_to_the_compute():
    assert precision_change("bf16", "fp32").startswith(
        "the weights and AdamW state were saved in bfloat16 and go on from those values in float32, and the "
        "steps after it compute in float32")
    assert precision_change("fp32", "bf16").startswith(
        "the float32 weights and AdamW state are rounded to bfloat16 as they load, and the steps after it "
        "compute in bfloat16,")
    assert precision_change("bf16-mixed", "fp32").startswith("the float32 weights and AdamW state load exactly")


# ------------------------------------------------------------------------------- init_from: values

def _gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size=64, d_model=16, n_layers=2, n_heads=4, seq_len=8)


def _launcher_state(tmp_path) -> dict:
    """The state dict of the model write_config(model=MODEL) describes, as pp.run builds it."""
    from pp.launcher.config import load_config
    from pp.launcher.models import build_model

    cfg = load_config(write_config(tmp_path / "shape.yaml", tmp_path / "unused", pp=1, model=MODEL))
    return {k: v.clone() for k, v in build_model(cfg.model, seed=3).state_dict().items()}


def test_integer_and_non_finite_weights_are_refused_before_any_weight_changes(tmp_path):
    model = _gpt(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = _gpt(1).state_dict()

    ints = {**good, "lm_head.weight": good["lm_head.weight"].round().to(torch.int64)}
    safetensors_torch.save_file(ints, str(tmp_path / "ints.safetensors"))
    with pytest.raises(WeightValuesError, match=r"1 mis-typed: lm_head.weight is int64 there but float32 "
                                                r"\(a floating-point tensor\) in the model"):
        load_weights(model, str(tmp_path / "ints.safetensors"), check_only=True)   # from the header alone
    torch.save(ints, tmp_path / "ints.pt")
    with pytest.raises(WeightValuesError, match="lm_head.weight is int64 there"):
        load_weights(model, str(tmp_path / "ints.pt"))

    nan = {k: v.clone() for k, v in good.items()}
    nan["lm_head.weight"][3, 5] = float("nan")
    nan["blocks.1.mlp.fc.weight"][0, 0] = float("inf")   # later in the model: the first is named
    safetensors_torch.save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(WeightValuesError) as err:
        load_weights(model, str(tmp_path / "nan.safetensors"))
    assert str(err.value).endswith(": blocks.1.mlp.fc.weight holds 1 inf of its 1024 values; expected "
                                   "finite weights (saved from a run that diverged, or damaged)"), err.value
    del nan["blocks.1.mlp.fc.weight"]
    with pytest.raises(WeightValuesError, match="lm_head.weight holds 1 NaN of its 1024 values"):
        load_weights(model, {**good, **{"lm_head.weight": nan["lm_head.weight"]}})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # nothing copied

    bf16 = {k: v.to(torch.bfloat16) for k, v in good.items()}   # another floating dtype is a plain cast
    load_weights(model, bf16)
    assert torch.equal(model.lm_head.weight, bf16["lm_head.weight"].float())


def _nan_on_stage_1(rank: int, world: int, path: str) -> dict:
    torch.manual_seed(0)
    model = pp.parallelize(_gpt(0), (torch.zeros(2, 8, dtype=torch.long),), n_microbatches=2, loss_fn=lm_loss,
                           device="cpu", split_spec={"blocks.1": pp.SplitPoint.BEGINNING})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        load_weights(model, path)
        error = None
    except WeightValuesError as e:
        error = str(e)
    return {"error": error, "unchanged": all(torch.equal(before[k], v) for k, v in model.state_dict().items())}


def test_a_non_finite_weight_on_one_stage_is_refused_on_every_rank_with_nothing_copied(tmp_path):
    state = _gpt(1).state_dict()
    state["lm_head.weight"][0, 0] = float("nan")   # held by stage 1 only
    safetensors_torch.save_file(state, str(tmp_path / "w.safetensors"))
    results = run_ranks(_nan_on_stage_1, 2, str(tmp_path / "w.safetensors"), timeout_s=120)
    assert results[0]["error"] == results[1]["error"] and "lm_head.weight holds 1 NaN" in results[0]["error"]
    assert all(r["unchanged"] for r in results), results


def _truncated_files(tmp_path) -> dict[str, str]:
    state = {"w": torch.randn(64, 64), "b": torch.randn(64)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    out = {}
    for name in ("zip", "legacy"):
        data = (tmp_path / f"{name}.pt").read_bytes()
        for label, cut in (("half", len(data) // 2), ("head", 100), ("tail", len(data) - 10)):
            (tmp_path / f"{name}-{label}.pt").write_bytes(data[:cut])
            out[f"{name}-{label}"] = str(tmp_path / f"{name}-{label}.pt")
    return out


def test_a_truncated_torch_save_file_is_named_damaged_not_unsafe(tmp_path):
    for label, path in _truncated_files(tmp_path).items():
        with pytest.raises(WeightsError) as err:
            open_weights(path)
        text = str(err.value)
        assert text.startswith(f"{path} is damaged or truncated: it begins as a torch.save file but is not a "
                               f"complete one ("), (label, text)
        assert "must not run code" not in text and "\n" not in text and "miniz" not in text, (label, text)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty\.pt is empty \(0 bytes\)"):
        open_weights(str(tmp_path / "empty.pt"))
    torch.save({"w": torch.zeros(2), "obj": object()}, tmp_path / "code.pt")   # whole, but pickles an object
    with pytest.raises(WeightsError, match="weights_only"):
        open_weights(str(tmp_path / "code.pt"))


@pytest.mark.parametrize("case", ["int64", "nan", "truncated"])
def test_pp_run_init_from_bad_weights_is_one_line_and_exit_2(tmp_path, capsys, case):
    state = _launcher_state(tmp_path)
    if case == "int64":
        state["lm_head.weight"] = state["lm_head.weight"].to(torch.int64)
        expected = "1 mis-typed: lm_head.weight is int64 there but float32 (a floating-point tensor) in the model"
    elif case == "nan":
        state["lm_head.weight"][1, 2] = float("nan")
        expected = "lm_head.weight holds 1 NaN of its"
    if case == "truncated":
        torch.save(state, tmp_path / "w.pt")
        path = tmp_path / "w.pt"
        path.write_bytes(path.read_bytes()[:3000])
        expected = "is damaged or truncated: it begins as a torch.save file but is not a complete one"
    else:
        path = tmp_path / "w.safetensors"
        safetensors_torch.save_file(state, str(path))
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "out", pp=1, steps=2, every=0, model=MODEL)
    code, out, err = _run(capsys, cfg, "--model.init_from", str(path))
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.startswith("pp.run:")]
    assert len(lines) == 1 and "Traceback" not in err and expected in lines[0], err
    assert f"model.init_from={str(path)!r}" in lines[0] and "step 1" not in out


# ------------------------------------------------------------------------------------- file modes

def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_export_and_checkpoint_files_get_the_mode_a_plain_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        model = _gpt(0)
        root = tmp_path / "run" / "checkpoints"
        path = ckpt.save(str(root), 3, {"model": model.state_dict()},
                         {"model": {"name": "gpt", "vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 4,
                                    "seq_len": 8}})
        open(tmp_path / "plain", "w").close()
        want = _mode(tmp_path / "plain")
        assert want == 0o640
        written = os.listdir(path)
        assert "manifest.json" in written and ".metadata" in written
        assert {n: _mode(os.path.join(path, n)) for n in written} == {n: want for n in written}

        from pp.export import export

        export(str(tmp_path / "run"), str(tmp_path / "whole"))
        export(str(tmp_path / "run"), str(tmp_path / "sharded"), max_shard_size=20_000)
        for out in (tmp_path / "whole", tmp_path / "sharded"):
            names = os.listdir(out)
            assert names and {n: _mode(out / n) for n in names} == {n: want for n in names}
        assert "model.safetensors.index.json" in os.listdir(tmp_path / "sharded")
    finally:
        os.umask(old)
