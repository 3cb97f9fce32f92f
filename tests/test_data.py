"""Tokenized data for pp.run: memory-mapped token files and shards, `pp.data prepare|inspect` with a tokenizer
trained here, held-out evaluation, TensorBoard curves across a resume, and one line for each bad input.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from pp.data import DataError, TokenBatches, open_stream
from pp.launcher.data import ByteBatches, load_corpus
from pp.launcher.metrics import read_metrics

from test_launcher_run import REPO, losses, main_in_process, torchrun

VOCAB = 1000


def _markov_tokens(n: int, seed: int = 0) -> np.ndarray:
    """A learnable token sequence: each id mostly follows from the one before."""
    rng = np.random.default_rng(seed)
    ids = np.empty(n, dtype=np.uint16)
    ids[0] = 1
    noise = rng.integers(0, 8, n)
    for i in range(1, n):
        ids[i] = (int(ids[i - 1]) * 7 + int(noise[i])) % VOCAB
    return ids


def _config(path, out, data, *, steps=10, every=5, vocab=VOCAB, extra="") -> str:
    text = (f"model: {{name: gpt, vocab_size: {vocab}, d_model: 32, n_layers: 2, n_heads: 2, seq_len: 16}}\n"
            f"parallel: {{pp: 2, timeout_s: 120}}\n"
            f"schedule: {{name: 1F1B, microbatches: 2}}\n"
            f"train: {{steps: {steps}, batch_size: 4, lr: 0.01, seed: 0, warmup_steps: 2, data: '{data}'}}\n"
            f"output: {{dir: '{out}'}}\n"
            f"checkpoint: {{every: {every}, resume: false}}\n" + extra)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


# ------------------------------------------------------------------------------------------- streams
def test_stdlib_batches_are_those_of_the_byte_corpus():
    stream = open_stream("stdlib")
    new = TokenBatches(stream, batch_size=4, seq_len=16, seed=3)
    old = ByteBatches(load_corpus("stdlib"), batch_size=4, seq_len=16, seed=3)
    for step in (1, 7):
        assert torch.equal(new.tokens(step), old.tokens(step)) and torch.equal(new.targets(step), old.targets(step))


def test_windows_reach_the_last_token_of_the_region(tmp_path):
    """Found in the field: window starts stopped one short, so the region's last token was never read and a
    file of exactly seq_len + 1 tokens (one whole window) was refused."""
    np.arange(20, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    stream = open_stream(str(tmp_path / "ids.bin"))
    batches = TokenBatches(stream, batch_size=16, seq_len=8, seed=0)
    starts = {int(s) for step in range(1, 40) for s in batches.starts(step)}
    assert starts == set(range(12)), sorted(starts)        # every window of 9 tokens in 20
    assert max(int(t.max()) for t in (batches.targets(s) for s in range(1, 40))) == 19
    one = TokenBatches(stream, batch_size=2, seq_len=19, seed=0)
    assert one.tokens(1).tolist() == [list(range(19))] * 2 and one.targets(1).tolist() == [list(range(1, 20))] * 2
    with pytest.raises(DataError, match="fewer than seq_len \\+ 1 = 21"):
        TokenBatches(stream, batch_size=2, seq_len=20, seed=0)
    corpus = torch.arange(20, dtype=torch.uint8)
    assert {int(s) for step in range(1, 40) for s in ByteBatches(corpus, 16, 8, 0).starts(step)} == set(range(12))


def test_glob_of_two_shards_reads_as_the_one_file_stream(tmp_path):
    ids = _markov_tokens(5000)
    ids.tofile(tmp_path / "all.bin")
    (tmp_path / "shards").mkdir()
    ids[:2100].tofile(tmp_path / "shards" / "a.bin")
    ids[2100:].tofile(tmp_path / "shards" / "b.bin")
    one = TokenBatches(open_stream(str(tmp_path / "all.bin")), 8, 32, seed=1, vocab_size=VOCAB)
    for source in (str(tmp_path / "shards" / "*.bin"), str(tmp_path / "shards")):
        two = TokenBatches(open_stream(source), 8, 32, seed=1, vocab_size=VOCAB)
        for step in range(1, 20):   # windows cross the shard boundary at 2100 now and then
            assert torch.equal(one.tokens(step), two.tokens(step)) and torch.equal(one.targets(step), two.targets(step))
    window = open_stream(str(tmp_path / "shards")).window(2090, 20)
    assert window.tolist() == ids[2090:2110].tolist()


def test_npy_and_uint32_token_files(tmp_path):
    ids = _markov_tokens(3000).astype(np.int64) + 70000
    np.save(tmp_path / "ids.npy", ids)
    ids.astype("<u4").tofile(tmp_path / "ids.bin")
    assert open_stream(str(tmp_path / "ids.npy")).window(5, 10).tolist() == ids[5:15].tolist()
    assert open_stream(str(tmp_path / "ids.bin"), "uint32").window(5, 10).tolist() == ids[5:15].tolist()
    with pytest.raises(DataError, match="stream position .* outside the model's vocabulary of 1000"):
        TokenBatches(open_stream(str(tmp_path / "ids.npy")), 2, 8, seed=0, vocab_size=VOCAB).tokens(1)


def test_uint32_ids_read_as_uint16_are_refused_unless_a_sidecar_says_uint16(tmp_path):
    small = _markov_tokens(3000).astype("<u4")     # ids < 1000 as uint32: every second uint16 is 0
    small.tofile(tmp_path / "small.bin")
    (_markov_tokens(3000).astype(np.int64) + 70000).astype("<u4").tofile(tmp_path / "big.bin")
    for name in ("small.bin", "big.bin"):
        with pytest.raises(DataError, match=f"{name}' looks like uint32 token ids .* set train.data_dtype: uint32"):
            open_stream(str(tmp_path / name))
    assert open_stream(str(tmp_path / "small.bin"), "uint32").window(3, 5).tolist() == small[3:8].tolist()
    _markov_tokens(3000).tofile(tmp_path / "u16.bin")      # real uint16 ids, and tiny vocabularies, pass
    (np.arange(4000, dtype=np.uint16) % 4).tofile(tmp_path / "dna.bin")
    assert len(open_stream(str(tmp_path / "u16.bin"))) == 3000 and len(open_stream(str(tmp_path / "dna.bin"))) == 4000
    from pp.data.__main__ import inspect
    assert any("try --dtype uint32" in line for line in inspect(str(tmp_path / "small.bin"), None, None, 4))
    assert not any("try --dtype" in line for line in inspect(str(tmp_path / "small.bin"), None, "uint32", 4))
    (tmp_path / "small.bin.json").write_text('{"dtype": "uint16"}')   # the user's word overrides the guess
    assert len(open_stream(str(tmp_path / "small.bin"))) == 6000


# ------------------------------------------------------------------------------------ tokenizer, prepare
def _tokenizer(tmp_path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"the pipeline sends microbatch {i} to stage {i % 4}\n" for i in range(200)]
    tok.train_from_iterator(corpus, trainer)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    return path


DOCS = ["the first stage sends its activations.\nThen the second one.\n", "weights: 1F1B keeps memory flat\n",
        "zero bubble splits the backward"]


def test_prepare_round_trips_the_text_with_an_end_of_text_token_between_documents(tmp_path):
    from tokenizers import Tokenizer

    tok_path = _tokenizer(tmp_path)
    (tmp_path / "a.txt").write_text(DOCS[0])
    with open(tmp_path / "b.jsonl", "w") as f:
        for d in DOCS[1:]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    out = tmp_path / "data" / "train.bin"
    proc = subprocess.run([sys.executable, "-m", "pp.data", "prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                           "--tokenizer", tok_path, "-o", str(out)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ids = np.fromfile(out, dtype="<u2")
    assert proc.stdout.startswith(f"pp.data: 3 documents, {ids.size} tokens (uint16: set train.data_dtype: uint16)")
    tok = Tokenizer.from_file(tok_path)
    eot = tok.token_to_id("<|endoftext|>")
    assert (ids == eot).sum() == 3 and ids[-1] == eot
    pieces = np.split(ids, np.flatnonzero(ids == eot) + 1)[:3]
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == DOCS
    assert json.load(open(str(out) + ".json"))["dtype"] == "uint16"
    shown = subprocess.run([sys.executable, "-m", "pp.data", "inspect", str(out), "--tokenizer", tok_path],
                           capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert f"{ids.size:,} tokens of uint16" in shown.stdout and "documents: 3" in shown.stdout
    assert "decoded: 'the first stage" in shown.stdout
    # -o x.npy writes a real .npy (it wrote raw ids, which pp.run then could not read as .npy)
    npy = tmp_path / "data" / "train.npy"
    proc = subprocess.run([sys.executable, "-m", "pp.data", "prepare", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"),
                           "--tokenizer", tok_path, "-o", str(npy)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert np.load(npy).tolist() == ids.tolist()
    assert open_stream(str(npy)).window(0, ids.size).tolist() == ids.tolist()


def test_text_with_a_tokenizer_is_tokenized_once_and_cached_next_to_the_data(tmp_path):
    tok_path = _tokenizer(tmp_path)
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for d in DOCS * 20:
            f.write(json.dumps({"text": d}) + "\n")
    first = open_stream(str(tmp_path / "corpus.jsonl"), tokenizer=tok_path)
    cache = [p for p in os.listdir(tmp_path) if p.startswith("corpus.jsonl.") and p.endswith(".bin")]
    assert len(cache) == 1
    stamp = os.path.getmtime(tmp_path / cache[0])
    again = open_stream(str(tmp_path / "corpus.jsonl"), tokenizer=tok_path)
    assert os.path.getmtime(tmp_path / cache[0]) == stamp and len(again) == len(first) > 100
    # A corpus replaced by another file with an older time (cp -p, tar x, rsync -t) was read from the old
    # cache, silently (found by a fresh-user check): the cache records the file's size and time.
    with open(tmp_path / "new.jsonl", "w") as f:
        f.write(json.dumps({"text": DOCS[1]}) + "\n")
    os.utime(tmp_path / "new.jsonl", (1_500_000_000, 1_500_000_000))
    os.replace(tmp_path / "new.jsonl", tmp_path / "corpus.jsonl")
    replaced = open_stream(str(tmp_path / "corpus.jsonl"), tokenizer=tok_path)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    want = tok.encode(DOCS[1], add_special_tokens=False).ids + [tok.token_to_id("<|endoftext|>")]
    assert replaced.window(0, len(want)).tolist() == want and len(replaced) == len(want)


# ------------------------------------------------------------------------------------- pp.run on tokens
@pytest.fixture(scope="module")
def bin_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("binrun")
    _markov_tokens(40_000).tofile(tmp / "train.bin")
    cfg = _config(tmp / "cfg.yaml", tmp / "out", tmp / "train.bin",
                  extra="eval: {every: 5, steps: 2}\noutput: {dir: '%s', tensorboard: true}\n" % (tmp / "out"))
    proc = torchrun(2, cfg)
    assert proc.returncode == 0, proc.log[-4000:]
    return tmp, cfg, proc


def test_bin_file_with_vocab_1000_trains_on_two_ranks(bin_run):
    tmp, _, proc = bin_run
    recs = read_metrics(str(tmp / "out" / "metrics.jsonl"))
    assert [r["step"] for r in recs] == list(range(1, 11))
    first, last = [r["loss"] for r in recs[:3]], [r["loss"] for r in recs[-3:]]
    assert sum(last) < sum(first), [r["loss"] for r in recs]


def test_eval_every_5_writes_val_loss_at_steps_5_and_10(bin_run):
    tmp, _, proc = bin_run
    recs = {r["step"]: r for r in read_metrics(str(tmp / "out" / "metrics.jsonl"))}
    assert sorted(s for s, r in recs.items() if "val_loss" in r) == [5, 10]
    assert recs[10]["val_loss"] < recs[5]["val_loss"] and recs[10]["val_ppl"] == pytest.approx(np.exp(recs[10]["val_loss"]))
    assert "step 5/10 val_loss" in proc.stdout


def test_resume_on_tokens_is_exact_and_tensorboard_keeps_one_point_per_step(bin_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, cfg, _ = bin_run
    out = tmp / "out"
    reference = losses(out)
    # the interrupted run's state: checkpoint step-5, metrics and TensorBoard events up to step 10
    shutil.rmtree(out / "checkpoints" / "step-10")
    proc = torchrun(2, cfg, "--checkpoint.resume", "true")
    assert proc.returncode == 0, proc.log[-4000:]
    assert "(step 5," in proc.stdout
    assert losses(out) == reference
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == list(range(1, 11)), steps
    assert [e.step for e in acc.Scalars("train/val_loss")] == [5, 10]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s", "train/bubble"} <= set(acc.Tags()["scalars"])


def test_a_fresh_run_into_the_same_dir_replaces_the_earlier_runs_tensorboard_curves(bin_run, tmp_path):
    """Found in the field: a fresh run (checkpoint.resume false) kept the earlier run's event files, so
    every curve had two points per step and steps the new run never trained. The earlier files go when
    the new run logs its first step (a run that fails before that leaves them)."""
    from pp.launcher.sinks import ScalarSinks
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, cfg, _ = bin_run
    out = tmp / "out"
    proc = torchrun(2, cfg, "--train.steps", "3", "--train.lr", "0.001")
    assert proc.returncode == 0, proc.log[-4000:]
    files = list((out / "tensorboard").glob("*tfevents*"))
    assert len(files) == 1, files
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(list(losses(out).values()), rel=1e-6)
    # opened but no step logged (a start that failed): the earlier run's events stay
    sinks = ScalarSinks(str(out), 0, True, False, {})
    sinks.close()
    assert files[0].exists()


# ------------------------------------------------------------------------------------------ bad input
def _run_one(tmp_path, data, *args, vocab=VOCAB, extra="", capsys=None):
    """`python -m pp.run` on one rank; with `capsys`, pp.run's main in this process (for a config refused
    before training: no interpreter start), as a CompletedProcess either way."""
    cfg = _config(tmp_path / "bad.yaml", tmp_path / "out", data, steps=2, every=0, vocab=vocab, extra=extra)
    text = open(cfg).read().replace("pp: 2", "pp: 1")
    open(cfg, "w").write(text)
    if capsys is not None:
        code, out, err = main_in_process(capsys, cfg, *args)
        return subprocess.CompletedProcess([cfg, *args], code, out, err)
    return subprocess.run([sys.executable, "-m", "pp.run", cfg, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}, timeout=180)


@pytest.mark.parametrize("case, expected", [
    ("missing", "pp.run: bad config: train.data='{d}/nope.bin': no such file"),
    ("dtype", "pp.run: bad config: train.data_dtype='int8': expected uint16 or uint32"),
    ("odd", "pp.run: bad config: '{d}/odd.bin' has 5 bytes, not a whole number of uint16 token ids"),
    ("eval", "pp.run: bad config: eval.every=-1: expected 0 (never) or a positive number of steps"),
    ("vocab", "pp.run: bad data: {d}/big.bin: token id "),
    ("recorded-vocab", "pp.run: bad config: train.data='{d}/big.bin' was tokenized with a vocabulary of 900"),
])
def test_bad_data_input_is_one_line(tmp_path, case, expected, capsys):
    d = str(tmp_path)
    _markov_tokens(4000).tofile(tmp_path / "ok.bin")
    (tmp_path / "odd.bin").write_bytes(b"\x01" * 5)
    (np.arange(4000, dtype=np.uint16) % 900).tofile(tmp_path / "big.bin")
    data, args, vocab = {"missing": (f"{d}/nope.bin", [], VOCAB), "dtype": (f"{d}/ok.bin", ["--train.data_dtype", "int8"], VOCAB),
                         "odd": (f"{d}/odd.bin", [], VOCAB), "eval": (f"{d}/ok.bin", ["--eval.every", "-1"], VOCAB),
                         "vocab": (f"{d}/big.bin", [], 500), "recorded-vocab": (f"{d}/big.bin", [], 500)}[case]
    if case == "recorded-vocab":   # what pp.data prepare writes beside its shards: refused before training
        (tmp_path / "big.bin.json").write_text('{"dtype": "uint16", "vocab_size": 900}')
    # refused before training: pp.run's main in this process; bad ids are found by the ranks in step 1,
    # which pp.run then ends by os._exit: a process of its own
    proc = _run_one(tmp_path, data, *args, vocab=vocab, capsys=None if case == "vocab" else capsys)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected.format(d=d)), proc.stderr[-3000:]
    if case == "vocab":
        assert "outside the model's vocabulary of 500 (model.vocab_size)" in lines[0]
