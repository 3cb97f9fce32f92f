"""Token files that disagree with their `.json` description, ids outside the vocabulary found before a fresh run
removes anything, and a train.tokenizer that is not the one pre-tokenized data was prepared with.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pp.data import DataError, TokenBatches, TokenStream, open_stream
from pp.data.__main__ import inspect, main as data_main
from pp.data.tokenize import check_tokenizer, write_tokens

from test_data import _config, _markov_tokens, _tokenizer
from test_launcher_run import REPO, main_in_process

VOCAB = 1000


def _prepared(path, n: int = 3000) -> np.ndarray:
    """A token file with the description `pp.data prepare` writes beside it; its ids."""
    ids = _markov_tokens(n).astype(np.int64)
    write_tokens(str(path), ids, "uint16", {"vocab_size": VOCAB, "documents": 1})
    return ids


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _config_one_rank(tmp_path, data) -> str:
    cfg = _config(tmp_path / "cfg.yaml", tmp_path / "out", data, steps=2, every=2)
    text = open(cfg).read().replace("pp: 2", "pp: 1")
    open(cfg, "w").write(text)
    return cfg


def _in_process(capsys, tmp_path, data, *args) -> subprocess.CompletedProcess:
    """pp.run on one rank, in this process: for runs that end by returning (a config refused, a run done)."""
    cfg = _config_one_rank(tmp_path, data)
    code, out, err = main_in_process(capsys, cfg, *args)
    return subprocess.CompletedProcess([cfg, *args], code, out, err)


def _process(cfg: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m pp.run` on one rank: pp.run ends a run that finds bad data by os._exit."""
    return subprocess.run([sys.executable, "-m", "pp.run", cfg, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}, timeout=180)


# -------------------------------------------------------------------- 1. a file and its description disagree
def test_a_truncated_token_file_is_refused_naming_both_counts(tmp_path):
    """Found by a tester: a .bin cut to 50,000 of the 331,176 ids its .json records trained without a word."""
    path = tmp_path / "train.bin"
    _prepared(path)
    os.truncate(path, 1000)
    want = (f"'{path}' holds 500 uint16 token ids, but '{path}.json' records 3,000 (truncated, or changed since "
            f"pp.data prepare wrote it): re-run pp.data prepare")
    with pytest.raises(DataError) as e:
        open_stream(str(path))
    assert str(e.value).startswith(want), e.value
    with pytest.raises(DataError, match="holds 500 uint16 token ids, but"):
        inspect(str(path), None, None, 4)
    os.truncate(path, 1001)        # not even whole ids: the count is still what is named
    with pytest.raises(DataError, match="holds 500 uint16 token ids and 1 stray byte\\(s\\), but .* records 3,000"):
        open_stream(str(path))


def test_a_count_of_another_dtype_or_a_short_npy_is_refused(tmp_path):
    ids = _markov_tokens(3000)
    ids.tofile(tmp_path / "a.bin")          # uint16 ids described as uint32 ones
    (tmp_path / "a.bin.json").write_text('{"dtype": "uint32", "tokens": 3000}')
    with pytest.raises(DataError, match="a.bin' holds 1,500 uint32 token ids, but .* records 3,000"):
        open_stream(str(tmp_path / "a.bin"), "uint32")
    write_tokens(str(tmp_path / "b.npy"), ids[:2000].astype(np.int64), "uint16", {})
    (tmp_path / "b.npy.json").write_text('{"dtype": "uint16", "tokens": 3000}')
    with pytest.raises(DataError, match="b.npy' holds 2,000 uint16 token ids, but .* records 3,000"):
        open_stream(str(tmp_path / "b.npy"))
    with pytest.raises(DataError, match="b.npy' holds 2,000 uint16 token ids"):
        inspect(str(tmp_path / "b.npy"), None, None, 4)


def test_an_intact_prepared_file_and_a_hand_written_dtype_sidecar_still_read(tmp_path):
    ids = _prepared(tmp_path / "ok.bin")
    assert open_stream(str(tmp_path / "ok.bin")).window(0, 3000).tolist() == ids.tolist()
    assert inspect(str(tmp_path / "ok.bin"), None, None, 2)[0].endswith("3,000 tokens of uint16")
    _markov_tokens(100).tofile(tmp_path / "hand.bin")
    (tmp_path / "hand.bin.json").write_text('{"dtype": "uint16"}')     # no count recorded: nothing to compare
    assert len(open_stream(str(tmp_path / "hand.bin"))) == 100


SIDECARS = {
    "not-json": ("{bad", "is not readable JSON"),
    "a-list": ("[1, 2]", "holds a JSON list; expected the object pp.data prepare writes beside"),
    "vocab-big": ('{"vocab_size": "big"}', "records vocab_size 'big'; expected a positive vocabulary size"),
    "tokens-negative": ('{"tokens": -1}', "records tokens -1; expected a count of 0 or more token ids"),
    "dtype-int8": ('{"dtype": "int8"}', "records dtype 'int8'; expected one of uint16, uint32"),
}


@pytest.mark.parametrize("case", SIDECARS)
def test_a_malformed_sidecar_is_refused_by_open_stream_and_inspect(tmp_path, case, capsys):
    """Found by a tester: pp.run ignored these (exit 0) where inspect refused two of them."""
    text, expected = SIDECARS[case]
    _markov_tokens(3000).tofile(tmp_path / "s.bin")
    (tmp_path / "s.bin.json").write_text(text)
    with pytest.raises(DataError, match=f"^'{tmp_path}/s.bin.json' .*re-run pp.data prepare") as e:
        open_stream(str(tmp_path / "s.bin"))
    assert expected in str(e.value)
    assert data_main(["inspect", str(tmp_path / "s.bin")]) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"pp.data: '{tmp_path}/s.bin.json' ")


@pytest.mark.parametrize("damage", ["truncate", "sidecar"])
def test_pp_run_refuses_a_damaged_token_file_before_training(tmp_path, damage, capsys):
    path = tmp_path / "tr2.bin"
    _prepared(path)
    if damage == "truncate":
        os.truncate(path, 1000)
        want = f"pp.run: bad config: '{path}' holds 500 uint16 token ids, but '{path}.json' records 3,000"
    else:
        (tmp_path / "tr2.bin.json").write_text("[1, 2]")
        want = f"pp.run: bad config: '{path}.json' holds a JSON list"
    proc = _in_process(capsys, tmp_path, path)
    assert proc.returncode == 2 and _one_line(proc.stderr).startswith(want), proc.stderr
    assert "re-run pp.data prepare" in proc.stderr and not (tmp_path / "out").exists()


def _corpus(tmp_path) -> tuple[str, str]:
    tok = _tokenizer(tmp_path)
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": f"stage {i % 4} sends microbatch {i} to the next one"}) + "\n")
    return str(tmp_path / "corpus.jsonl"), tok


@pytest.mark.parametrize("damage", ["truncate", "sidecar-list", "sidecar-missing"])
def test_a_damaged_tokenizer_cache_is_tokenized_again_with_a_warning(tmp_path, damage):
    """Found by a tester: a cache cut to 500 of its 16,328 ids was trained on without tokenizing again."""
    corpus, tok = _corpus(tmp_path)
    want = open_stream(corpus, tokenizer=tok).window(0, 400).tolist()
    cache = next(str(p) for p in tmp_path.glob("corpus.jsonl.*.bin"))
    recorded = json.load(open(cache + ".json"))["tokens"]
    if damage == "truncate":
        os.truncate(cache, 100)
    elif damage == "sidecar-list":
        open(cache + ".json", "w").write("[1]")
    else:
        os.remove(cache + ".json")
    with pytest.warns(UserWarning, match=f"the token cache '{cache}' is unusable .*: tokenizing '{corpus}' again"):
        again = open_stream(corpus, tokenizer=tok)
    assert len(again) == recorded and again.window(0, 400).tolist() == want
    assert json.load(open(cache + ".json"))["tokens"] == recorded


# ------------------------------------------------------------- 2. bad ids found before anything is removed
def test_check_ids_reads_unbounded_shards_in_chunks_and_names_the_position(tmp_path, monkeypatch):
    import pp.data.stream as stream_mod

    monkeypatch.setattr(stream_mod, "SCAN_CHUNK", 1000)
    ids = _markov_tokens(5000)
    ids[3456] = 1900
    stream = TokenStream([_markov_tokens(2000), ids], ["a.bin", "b.bin"])
    with pytest.raises(DataError, match=r"^b.bin: token id 1900 \(stream position 5456\) is outside the model's "
                                        r"vocabulary of 1000 \(model.vocab_size\)$"):
        stream.check_ids(VOCAB)
    assert stream.check_ids(2000)
    assert not stream.check_ids(VOCAB, max_bytes=1000)          # too large to read up front: left to the batches
    assert TokenStream([ids], ["b.bin"], [VOCAB]).check_ids(VOCAB)   # a recorded vocabulary bounds it: not read
    negative = np.array([1, 2, -3, 4], dtype=np.int64)
    with pytest.raises(DataError, match="token id -3 \\(stream position 2\\)"):
        TokenStream([negative], ["n.npy"]).check_ids(VOCAB)


def test_eval_batches_check_reads_each_fixed_batch(tmp_path):
    ids = _markov_tokens(4000)
    ids.tofile(tmp_path / "e.bin")
    batches = TokenBatches(open_stream(str(tmp_path / "e.bin")), 4, 16, 0, vocab_size=VOCAB, salt=1)
    read = [{int(s) + k for s in batches.starts(step) for k in range(17)} for step in range(3)]
    ids[min(read[2] - read[0] - read[1])] = 1900      # read by the third batch only
    ids.tofile(tmp_path / "e.bin")
    batches = TokenBatches(open_stream(str(tmp_path / "e.bin")), 4, 16, 0, vocab_size=VOCAB, salt=1)
    batches.check(2)
    with pytest.raises(DataError, match="e.bin: token id 1900"):
        batches.check(3)


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A finished run's output.dir, with its checkpoint step-2, and a file of ids outside the vocabulary."""
    tmp = tmp_path_factory.mktemp("earlier")
    _markov_tokens(4000).tofile(tmp / "ok.bin")
    bad = _markov_tokens(40_000)
    bad[30_000] = 1900            # far from the first batches: only reading the whole file finds it at once
    bad.tofile(tmp / "nosc.bin")
    cfg = _config_one_rank(tmp, tmp / "ok.bin")
    proc = _process(cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp / "out" / "checkpoints" / "step-2").is_dir()
    return tmp, cfg


@pytest.mark.parametrize("key", ["eval.data", "train.data"])
def test_ids_outside_the_vocabulary_stop_a_fresh_run_before_it_removes_earlier_checkpoints(earlier_run, key):
    """Found by a tester: a bad id in eval.data was found at the first evaluation, after the fresh run had
    removed the earlier run's checkpoints from the same output.dir."""
    tmp, cfg = earlier_run
    before = sorted(os.listdir(tmp / "out" / "checkpoints"))
    args = (["--eval.every", "2", "--eval.steps", "400", "--eval.data", str(tmp / "nosc.bin")] if key == "eval.data"
            else ["--train.data", str(tmp / "nosc.bin")])
    proc = _process(cfg, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _one_line(proc.stderr).startswith(f"pp.run: bad data: {tmp}/nosc.bin: token id 1900 "), proc.stderr
    assert "removed" not in proc.stdout and "step 1/" not in proc.stdout, proc.stdout
    assert sorted(os.listdir(tmp / "out" / "checkpoints")) == before == ["step-2"]


# ---------------------------------------------------------------- 3. train.tokenizer with token files
def _other_tokenizer(tmp_path) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["another corpus altogether"] * 20, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "other.json"))
    return str(tmp_path / "other.json")


def test_a_train_tokenizer_other_than_the_one_the_data_was_prepared_with_is_refused(tmp_path, capsys):
    from pp.data.prepare import prepare

    corpus, tok = _corpus(tmp_path)
    other = _other_tokenizer(tmp_path)
    out = str(tmp_path / "p.bin")
    prepare([corpus], tok, out, None, 1)
    assert len(json.load(open(out + ".json"))["tokenizer_sha256"]) == 64
    assert check_tokenizer(out, tok) is None               # the same one: nothing to say
    proc = _in_process(capsys, tmp_path, out, "--train.tokenizer", other)
    assert proc.returncode == 2, proc.stderr
    assert _one_line(proc.stderr) == (f"pp.run: bad config: train.tokenizer={other!r} differs from the tokenizer "
                                      f"{tok!r} that {out!r} was prepared with (see {out}.json): name that one, "
                                      f"or leave train.tokenizer out")
    meta = json.load(open(out + ".json"))   # a description of an older pp: the file it names is compared
    del meta["tokenizer_sha256"]
    json.dump(meta, open(out + ".json", "w"))
    with pytest.raises(DataError, match="differs from the tokenizer"):
        check_tokenizer(out, other)
    assert check_tokenizer(out, tok) is None


def test_a_train_tokenizer_with_token_files_that_record_none_is_noted_as_unused(tmp_path, capsys):
    tok = _tokenizer(tmp_path)
    _markov_tokens(4000).tofile(tmp_path / "ids.bin")
    proc = _in_process(capsys, tmp_path, tmp_path / "ids.bin", "--train.tokenizer", tok, "--train.steps", "1",
                       "--checkpoint.every", "0")
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if "is unused" in line]
    assert notes == [f"pp.run: note: train.tokenizer={tok!r} is unused: train.data='{tmp_path}/ids.bin' holds "
                     f"token ids already (pre-tokenized), and no tokenizer is recorded beside them"], proc.stdout
