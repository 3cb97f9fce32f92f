"""Launcher config: YAML -> typed dataclasses, CLI overrides, and one clear line for each bad config."""
from __future__ import annotations

import textwrap

import pytest

from pp.launcher.config import ConfigError, JobConfig, help_text, load_config
from pp.run import EXIT_CONFIG, main

TINY = """
model:      {name: gpt, vocab_size: 256, d_model: 32, n_layers: 4, n_heads: 4, seq_len: 16}
parallel:   {pp: 4}
schedule:   {name: 1F1B, microbatches: 4}
train:      {steps: 6, batch_size: 8, lr: 3e-3, seed: 0}
output:     {dir: OUT}
checkpoint: {every: 3, resume: false}
"""


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(TINY.replace("OUT", str(tmp_path / "out")))
    return str(path)


def test_yaml_becomes_typed_config_with_defaults(cfg_file):
    cfg = load_config(cfg_file)
    assert isinstance(cfg, JobConfig)
    assert cfg.model.d_model == 32 and cfg.parallel.pp == 4 and cfg.schedule.name == "1F1B"
    assert cfg.train.lr == pytest.approx(3e-3) and isinstance(cfg.train.lr, float)  # YAML reads 3e-3 as a str
    assert cfg.train.grad_clip == 1.0 and cfg.parallel.dp == 1 and cfg.checkpoint.keep == 3  # defaults
    assert cfg.parallel.timeout_s > 0 and cfg.train.nan_check is True


def test_cli_overrides_are_typed_by_the_field(cfg_file):
    cfg = load_config(cfg_file, ["--train.steps", "20", "--train.lr=1e-2", "--checkpoint.resume", "true",
                                 "--split.points", "blocks.1,blocks.2,blocks.3", "--parallel.pp", "null"])
    assert cfg.train.steps == 20 and cfg.train.lr == pytest.approx(1e-2)
    assert cfg.checkpoint.resume is True and cfg.parallel.pp is None
    assert cfg.split.points == ["blocks.1", "blocks.2", "blocks.3"]


def test_custom_model_keys_become_constructor_args(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: 'tests.models:Tiny', hidden: 8, seq_len: 12}\n")
    cfg = load_config(str(path), ["--model.hidden", "16"])
    assert cfg.model.args == {"hidden": 16, "seq_len": 12} and cfg.model.seq_len == 12


def test_help_lists_every_key_with_default():
    text = help_text()
    for key in ("vocab_size", "microbatches", "timeout_s", "grad_clip", "warmup_steps", "resume", "points"):
        assert key in text
    assert "args" not in text.split("model:")[1].split("parallel:")[0]


@pytest.mark.parametrize("overrides, world, expected", [
    (["--train.setps", "3"], 4, "unknown key train.setps (did you mean 'train.steps'?)"),
    (["--trian.steps", "3"], 4, "unknown config section 'trian' (did you mean 'train'?)"),
    (["--schedule.name", "1F1F"], 4, "schedule.name='1F1F' is not a schedule pp ships (did you mean '1F1B'?)"),
    (["--schedule.microbatches", "3"], 4, "schedule.microbatches=3 does not divide train.batch_size=8"),
    ([], 2, "parallel.pp=4 x dp=1 x tp=1 = 4 ranks, but the world size is 2"),
    (["--parallel.pp", "3"], 4, "parallel.pp=3 x dp=1 x tp=1 = 3 ranks, but the world size is 4"),
    (["--parallel.pp", "null", "--parallel.dp", "2"], 3,
     "parallel.pp is unset and the world size 3 is not a multiple of dp=2 x tp=1"),
    (["--train.data", "/no/such/file.txt"], 4, "train.data='/no/such/file.txt': no such file"),
    (["--train.steps", "many"], 4, "train.steps: expected an integer, got 'many'"),
    (["--train.seed", "4600000000"], 4, "train.seed=4600000000: expected an integer from 0 to 2**32 - 1"),
    (["--train.seed", "-1"], 4, "train.seed=-1: expected an integer from 0 to 2**32 - 1"),
    (["--train.nan_check", "maybe"], 4, "train.nan_check: expected true or false, got 'maybe'"),
    (["--model.n_heads", "5"], 4, "model.n_heads=5 does not divide model.d_model=32"),
    (["--parallel.pp", "2", "--parallel.dp", "2", "--schedule.microbatches", "8"], 4,
     "schedule.microbatches=8 x parallel.dp=2 = 16 does not divide train.batch_size=8"),
    (["--parallel.pp", "1", "--parallel.tp", "4", "--model.n_heads", "2"], 4,
     "parallel.tp=4 does not divide model.n_heads=2"),
    (["--split.points", "blocks.1,blocks.9,blocks.3"], 4, "split.points: the model has no module 'blocks.9'"),
    (["--split.points", "blocks.1"], 4, "split.points has 1 entries but 4 stages need 3"),
    (["--split.points", "tok_emb,blocks.1,blocks.2"], 4,
     "split.points=['tok_emb', 'blocks.1', 'blocks.2'] leaves stage 0 without trainable parameters"),
    (["--schedule.name", "ZBVZeroBubble", "--schedule.stages_per_rank", "3"], 4, "schedule.stages_per_rank=3"),
    (["--model.name", "nosuchpkg.mod:Model"], 4, "cannot import module 'nosuchpkg.mod'"),
    (["--model.n_layers", "1"], 4, "model.n_layers=1 is too few for 4 stages"),
    (["--eval.every", "2", "--eval.data", "/no/such/eval.bin"], 4, "eval.data='/no/such/eval.bin': no such file"),
    (["--output.profile_step", "999"], 4, "output.profile_step=999: expected 0 (never) or a step number from 1"),
    (["--parallel.pp", "2", "--parallel.tp", "2", "--schedule.cuda_graphs", "true"], 4,
     "schedule.cuda_graphs=true with parallel.tp=2"),
    (["--parallel.pp", "2", "--parallel.dp", "2", "--parallel.zero", "3", "--schedule.cuda_graphs", "true",
      "--schedule.microbatches", "2"], 4, "schedule.cuda_graphs=true with parallel.zero=3"),
    (["--train.activation_checkpointing", "no"], 4,
     "train.activation_checkpointing='no': expected one of none, selective, full"),
    (["--schedule.name", "auto", "--split.points", "blocks.1,blocks.2,blocks.3"], 4,
     "split.points=['blocks.1', 'blocks.2', 'blocks.3'] with schedule.name auto: auto chooses the split itself"),
    (["--schedule.name", "auto", "--schedule.stages_per_rank", "2"], 4,
     "schedule.stages_per_rank=2 with schedule.name auto: auto chooses the stages per rank itself"),
])
def test_bad_config_is_one_line_and_exit_code(cfg_file, overrides, world, expected, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    assert main([cfg_file, *overrides]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pp.run: bad config: ") and expected in lines[0], lines[0]
    assert "Traceback" not in out + err


@pytest.mark.parametrize("text, expected", [
    ("train: {activation_checkpointing: no}", "train.activation_checkpointing=False: expected one of none, "
     "selective, full (YAML reads an unquoted yes/no/on/off as true/false)"),
    ("train: {precision: [bf16]}", "train.precision=['bf16']: expected one of fp32, bf16-mixed, bf16"),
    ("train: {precision: 16}", "train.precision=16: expected one of fp32, bf16-mixed, bf16"),
])
def test_a_value_of_the_wrong_type_for_a_word_key_is_told_the_words(tmp_path, text, expected, monkeypatch, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(text + "\n")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert main([str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"pp.run: bad config: {expected}"], err


def test_the_word_lists_of_the_config_are_those_of_the_code_that_takes_the_words():
    from pp.launcher.config import CHOICES
    from pp.parallel.checkpointing import MODES
    from pp.parallel.precision import PRECISIONS
    from pp.stage.compiled import PER

    assert CHOICES["train.precision"] == PRECISIONS
    assert CHOICES["train.activation_checkpointing"] == MODES
    assert CHOICES["schedule.compile_per"] == PER


def test_a_word_in_another_case_is_the_word(cfg_file):
    # as schedule.name ignores case, so do the one-of-a-few-words keys; an unknown word is still refused
    from pp.launcher.validate import validate

    cfg = load_config(cfg_file, ["--train.precision", "BF16-Mixed", "--train.activation_checkpointing", "Full",
                                 "--split.policy", "COST", "--parallel.device", "CPU"])
    validate(cfg, 4)
    assert (cfg.train.precision, cfg.train.activation_checkpointing, cfg.split.policy) == ("bf16-mixed", "full", "cost")
    assert cfg.parallel.device == "cpu"
    with pytest.raises(ConfigError, match="train.precision='BF17'"):
        validate(load_config(cfg_file, ["--train.precision", "BF17"]), 4)
    # YAML's null for a key whose word for nothing is none
    assert load_config(cfg_file, ["--train.activation_checkpointing", "null"]).train.activation_checkpointing == "none"
    with pytest.raises(ConfigError, match="train.precision='null'"):   # no word for nothing there
        validate(load_config(cfg_file, ["--train.precision", "null"]), 4)


def test_bad_config_is_silent_on_other_ranks(cfg_file, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert main([cfg_file, "--train.setps", "3"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_bad_yaml_and_missing_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        model: {name: gpt
        train: [1, 2
    """))
    assert main([str(bad)]) == EXIT_CONFIG
    assert main([str(tmp_path / "missing.yaml")]) == EXIT_CONFIG
    assert main([str(tmp_path)]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "is not valid YAML" in err[0] and "does not exist" in err[1]
    assert f"config file {str(tmp_path)!r} is a directory: expected a YAML file" in err[2]
    capsys.readouterr()
    binary = tmp_path / "binary.yaml"   # not text at all: one line, not a UnicodeDecodeError traceback
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert main([str(binary)]) == EXIT_CONFIG
    good = tmp_path / "good.yaml"   # a model section's YAML value on the command line, cut short
    good.write_text("model: {name: 'tests.models:Anything'}\n")
    assert main([str(good), "--model.width", "{a: 1"]) == EXIT_CONFIG
    assert main([str(good), "--model.name", "hf:LlamaForCausalLM", "--model.config", "{hidden_size: 32"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "is not UTF-8 text" in err[0], err
    assert "--model.width '{a: 1' is not valid YAML" in err[1], err
    assert "--model.config '{hidden_size: 32' is not valid YAML" in err[2], err
    twice = tmp_path / "twice.yaml"   # a second train: section replaces the first (YAML's rule), with a note
    twice.write_text("train: {steps: 3}\nschedule: {name: GPipe}\ntrain: {lr: 0.1}\n")
    cfg = load_config(str(twice))
    assert cfg.train.lr == pytest.approx(0.1) and cfg.train.steps != 3
    assert f"pp.run: note: {twice} writes 'train' a second time at line 3" in capsys.readouterr().out
    merged = tmp_path / "merged.yaml"   # YAML's merge key is not a key written twice
    merged.write_text("train: {<<: {steps: 3, lr: 0.5}, lr: 0.1}\n")
    cfg = load_config(str(merged))
    assert cfg.train.steps == 3 and cfg.train.lr == pytest.approx(0.1)
    capsys.readouterr()
    empty = tmp_path / "empty.yaml"   # no settings at all (comments only): the defaults, with a note
    empty.write_text("# train: {steps: 3}\n")
    assert load_config(str(empty)) == load_config(None)
    assert f"pp.run: note: config file {empty} holds no settings" in capsys.readouterr().out


def test_config_error_is_a_value_error():
    with pytest.raises(ConfigError):
        load_config(None, ["--model.vocab_size", "x"])


def test_shipped_configs_are_valid():
    import glob
    import os

    from pp.launcher.validate import validate

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
    assert len(paths) >= 6
    for path in paths:
        cfg = load_config(path)
        cfg.parallel.device = "auto"  # the GPU config is checked here on CPU
        layout = validate(cfg, cfg.parallel.pp * cfg.parallel.dp * cfg.parallel.tp)
        assert layout.n_stages >= cfg.parallel.pp, path


@pytest.mark.parametrize("name, make", [("checkpoints", "file"), ("tensorboard", "file"), ("metrics.jsonl", "dir"),
                                        ("summary.json", "dir"), (".pp.lock", "dir")])
def test_an_output_entry_of_the_wrong_kind_is_refused_before_training(cfg_file, tmp_path, name, make, monkeypatch,
                                                                     capsys):
    """A file where pp.run writes its checkpoints directory (or a directory where it writes a file) failed
    with a traceback after the first step had trained, or at the end of the run; a `.pp.lock` directory
    was blamed on the model."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if make == "dir" else (out / name).write_text("x")
    assert main([cfg_file]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"pp.run: bad config: output.dir={str(out)!r} holds {name!r} as a "
                                        f"{'directory' if make == 'dir' else 'file'}, where pp.run writes its "
                                        f"{'file' if make == 'dir' else 'directory'} of that name; move it away"]
    assert sorted(p.name for p in out.iterdir()) == [name]


def test_unset_pp_is_the_world_over_dp_times_tp(cfg_file):
    """parallel.pp: null means world / (dp x tp), as --help and the docs say (it took the world size,
    and so refused every dp > 1 or tp > 1 run that left pp unset)."""
    from pp.launcher.validate import validate

    cfg = load_config(cfg_file, ["--parallel.pp", "null", "--parallel.dp", "2", "--schedule.microbatches", "2"])
    assert validate(cfg, 4).pp == 2
    cfg = load_config(cfg_file, ["--parallel.pp", "null"])
    assert validate(cfg, 4).pp == 4
