"""`python -m pp.data prepare|inspect` on bad input: one line naming the bad value, exit code 2, no traceback,
and nothing written, changed or left behind (found by a tester: an output that overwrote the corpus or the
tokenizer, tracebacks for a directory or a file as output and for corrupt, empty or float token files).

Each case runs through `main(argv)` in its own directory; one per subcommand also runs as its own process.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest

REPO = str(Path(__file__).resolve().parent.parent)


def _tokenizer(path: Path) -> None:
    """A tiny byte-level BPE tokenizer.json with an end-of-text token, trained here (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"stage {i % 4} sends microbatch {i}\n" for i in range(100)], trainer)
    tok.save(str(path))


def _prepare(*args: str) -> list[str]:
    return ["prepare", "in.jsonl", "--tokenizer", "tokenizer.json", *args]


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def _npy(name: str, arr: np.ndarray) -> Callable[[Path], None]:
    return lambda d: np.save(d / name, arr)


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).mkdir(parents=True)


def _ids(name: str, sidecar: bytes) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        np.arange(10, dtype="<u2").tofile(d / name)
        (d / (name + ".json")).write_bytes(sidecar)
    return make


# case: (extra files to make, argv after `-m pp.data`, how the one stderr line starts; {d} is the case's directory)
CASES: dict[str, tuple[Callable[[Path], None] | None, list[str], str]] = {
    # prepare -o onto an input, the tokenizer, or where its .json sidecar is the tokenizer: was exit 0, overwritten
    "out-is-input": (None, _prepare("-o", "in.jsonl"),
                     "pp.data: -o 'in.jsonl' would overwrite the input 'in.jsonl'"),
    "out-is-tokenizer": (None, _prepare("-o", "tokenizer.json"),
                         "pp.data: -o 'tokenizer.json' would overwrite the tokenizer 'tokenizer.json'"),
    "sidecar-is-tokenizer": (None, _prepare("-o", "tokenizer"),
                             "pp.data: -o 'tokenizer' would overwrite the tokenizer 'tokenizer.json' with the .json"),
    # -o a directory, under a file, or where the sidecar is a directory: tracebacks, temp files left behind
    "out-is-dir/": (_mkdir("somedir"), _prepare("-o", "somedir/"), "pp.data: -o 'somedir/' names a directory"),
    "out-is-dir": (_mkdir("somedir"), _prepare("-o", "somedir"), "pp.data: -o 'somedir' names a directory"),
    "out-under-file": (_write("afile", b"x"), _prepare("-o", "afile/x.bin"),
                       "pp.data: -o 'afile/x.bin' lies under '{d}/afile', which is a file, not a directory"),
    # -o without .bin/.npy: pp.run read the ids as text bytes; -o x.npy wrote raw ids pp.run could not read
    "out-no-suffix": (None, _prepare("-o", "data/train"),
                      "pp.data: -o 'data/train': expected a token file name ending in .bin or .npy"),
    # a write that fails after the directories for -o were made: they were left behind
    "out-name-too-long": (None, _prepare("-o", "new/sub/" + "x" * 300 + ".bin"), "pp.data: cannot use 'new/sub/xxx"),
    "sidecar-is-dir": (_mkdir("x.bin.json"), _prepare("-o", "x.bin"),
                       "pp.data: -o 'x.bin' would write 'x.bin.json', which is a directory"),
    # prepare inputs: an empty file wrote a 1-token (or 0-token) dataset, non-UTF-8 .jsonl was a traceback
    "empty-txt-input": (_write("empty.txt", b""), ["prepare", "empty.txt", "--tokenizer", "tokenizer.json", "-o", "x.bin"],
                        "pp.data: input 'empty.txt' is empty"),
    "blank-jsonl-input": (_write("blank.jsonl", b"\n \n"),
                          ["prepare", "blank.jsonl", "--tokenizer", "tokenizer.json", "-o", "x.bin"],
                          "pp.data: input 'blank.jsonl' has no documents"),
    "latin1-jsonl-input": (_write("l1.jsonl", b'{"text": "caf\xe9"}\n'),
                           ["prepare", "l1.jsonl", "--tokenizer", "tokenizer.json", "-o", "x.bin"],
                           "pp.data: l1.jsonl:1 is not UTF-8 text"),
    # inspect: tracebacks for these files; float ids and a negative sample were accepted
    "inspect-corrupt-npy": (_write("c.npy", b"\x93NUMPY garbage"), ["inspect", "c.npy"],
                            "pp.data: 'c.npy' is not a readable .npy array"),
    "inspect-float-npy": (_npy("f.npy", np.zeros(8, np.float32)), ["inspect", "f.npy"],
                          "pp.data: 'f.npy' holds a float32 array of shape (8,); expected a 1-D array of integer"),
    "inspect-empty-bin": (_write("e.bin", b""), ["inspect", "e.bin"], "pp.data: 'e.bin' is empty"),
    "inspect-empty-txt": (_write("e.txt", b""), ["inspect", "e.txt"], "pp.data: 'e.txt' is empty"),
    "inspect-sidecar-not-json": (_ids("s.bin", b"{bad"), ["inspect", "s.bin"],
                                 "pp.data: 's.bin.json' is not readable JSON"),
    "inspect-sidecar-a-list": (_ids("s.bin", b"[1]"), ["inspect", "s.bin"],
                               "pp.data: 's.bin.json' holds a JSON list"),
    "inspect-negative-sample": (_ids("s.bin", b"{}"), ["inspect", "s.bin", "--sample", "-5"],
                                "pp.data: --sample -5: expected 0 or more"),
}


class Run(NamedTuple):
    returncode: int
    stderr: str
    expected: str
    before: dict[str, bytes | None]
    after: dict[str, bytes | None]


def _snapshot(d: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and directory (None) under `d`."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


# the cases run in a process of their own too (end to end, as a user's shell runs them): one per subcommand
IN_SUBPROCESS = ("out-is-input", "inspect-corrupt-npy")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    """Every case's run, in its own directory: in this process through `main(argv)` (an exception out of it is
    a traceback), and for IN_SUBPROCESS as `python -m pp.data` too, those processes started at once."""
    from pp.data.__main__ import main

    root = tmp_path_factory.mktemp("cli")
    _tokenizer(root / "tokenizer.json")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    out, started, here = {}, {}, os.getcwd()
    for name, (make, argv, expected) in CASES.items():
        for where in ("process", "main") if name in IN_SUBPROCESS else ("main",):
            d = root / (name.replace("/", "-slash") + ("-process" if where == "process" else ""))
            d.mkdir()
            (d / "tokenizer.json").write_bytes((root / "tokenizer.json").read_bytes())
            (d / "in.jsonl").write_text("".join(json.dumps({"text": f"stage {i} sends"}) + "\n" for i in range(3)))
            if make is not None:
                make(d)
            before = _snapshot(d)
            if where == "process":
                proc = subprocess.Popen([sys.executable, "-m", "pp.data", *argv], cwd=d, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                started[name + " (process)"] = (d, expected.format(d=d), before, proc)
                continue
            err = io.StringIO()
            try:
                os.chdir(d)
                with contextlib.redirect_stderr(err):
                    code = main(argv)
            finally:
                os.chdir(here)
            out[name] = Run(code, err.getvalue(), expected.format(d=d), before, _snapshot(d))
    for name, (d, expected, before, proc) in started.items():
        _, stderr = proc.communicate(timeout=120)
        out[name] = Run(proc.returncode, stderr, expected, before, _snapshot(d))
    return out


def _check(run: Run) -> None:
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 2, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(run.expected), run.stderr[-3000:]
    assert run.after == run.before, f"files changed: {sorted(set(run.after) ^ set(run.before))}"


@pytest.mark.parametrize("case", ["out-is-input", "out-is-tokenizer", "sidecar-is-tokenizer"])
def test_prepare_refuses_an_output_that_would_overwrite_an_input_or_the_tokenizer(runs, case):
    _check(runs[case])


@pytest.mark.parametrize("case", ["out-is-dir/", "out-is-dir", "out-under-file", "sidecar-is-dir", "out-no-suffix",
                                  "out-name-too-long"])
def test_prepare_refuses_an_output_that_cannot_be_written_and_leaves_no_temp_files(runs, case):
    _check(runs[case])


@pytest.mark.parametrize("case", ["empty-txt-input", "blank-jsonl-input", "latin1-jsonl-input"])
def test_prepare_refuses_an_input_without_documents_or_not_utf8(runs, case):
    _check(runs[case])


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("inspect-")])
def test_inspect_refuses_a_bad_token_file_or_sample_in_one_line(runs, case):
    _check(runs[case])


@pytest.mark.parametrize("case", IN_SUBPROCESS)
def test_the_command_line_itself_is_one_line_exit_code_2_and_no_traceback(runs, case):
    _check(runs[case + " (process)"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any directory")
def test_prepare_refuses_an_output_in_a_directory_it_cannot_write(tmp_path):
    _tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "stage 1 sends"}) + "\n")
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        proc = subprocess.run([sys.executable, "-m", "pp.data", *_prepare("-o", "ro/x.bin")], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=120)
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    _check(Run(proc.returncode, proc.stderr, f"pp.data: -o 'ro/x.bin' cannot be written: no permission to write "
                                             f"in '{tmp_path}/ro'", {}, {}))
    assert not os.listdir(tmp_path / "ro")


def test_write_tokens_removes_its_temp_files_when_writing_fails(tmp_path, monkeypatch):
    from pp.data.tokenize import write_tokens

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", dst)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        write_tokens(str(tmp_path / "x.bin"), np.arange(5), "uint16", {})
    assert os.listdir(tmp_path) == []


def test_an_os_error_while_writing_is_one_line(tmp_path, monkeypatch, capsys):
    import pp.data.prepare
    from pp.data.__main__ import main

    def full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    _tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "stage 1 sends"}) + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pp.data.prepare, "write_tokens", full)
    assert main(_prepare("-o", "x.bin")) == 2
    err = capsys.readouterr().err
    assert err == "pp.data: cannot use 'x.bin': No space left on device\n"


def test_a_failed_tokenization_for_pp_run_leaves_no_lock_file_beside_the_data(tmp_path):
    from pp.data import DataError, open_stream

    _tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "bad.jsonl").write_text('{"text": "stage 1"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not a JSON object"):
        open_stream(str(tmp_path / "bad.jsonl"), tokenizer=str(tmp_path / "tokenizer.json"))
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "tokenizer.json"]
