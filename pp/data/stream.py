"""A token stream: one long sequence of token ids, read as windows, never loaded whole.

Sources (`train.data`): `stdlib` (this Python's standard library sources, as bytes), a text file (its
bytes, memory-mapped), a `.bin` file of little-endian token ids (nanoGPT's layout; dtype uint16 or
uint32) or a `.npy` array, a directory or glob of such shards (one stream, in sorted order), or a text /
`.jsonl` file with a tokenizer (tokenized once, cached next to the data; see `pp.data.tokenize`).
"""
from __future__ import annotations

import bisect
import glob
import json
import os
import sysconfig
from typing import Sequence

import numpy as np

STDLIB = "stdlib"
TOKEN_SUFFIXES = (".bin", ".npy")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SCAN_BYTES = 4 << 30    # token files without a recorded vocabulary up to this size are read whole before training
SCAN_CHUNK = 1 << 24    # ids read at a time by that scan (32-64 MiB), so its memory stays flat
REDO = "re-run pp.data prepare to write the file and its .json again"


class DataError(ValueError):
    """The data cannot be used as asked; the message is one line naming the file and what was expected."""


def stdlib_files() -> list[str]:
    """The fixed, sorted list of files the default corpus is made of."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


class TokenStream:
    """Shards of token ids read as one sequence. `window(start, n)` -> int64 array of n ids.

    `shards` are 1-D numpy arrays (usually memory maps) and `names` the files they come from, used to name
    the file of a bad token id. `vocabs[i]`, where known, bounds shard i's ids: the vocabulary size that
    `pp.data prepare` recorded beside it (or 256 for bytes); None where nothing bounds them.
    """

    def __init__(self, shards: Sequence[np.ndarray], names: Sequence[str],
                 vocabs: Sequence[int | None] | None = None):
        self.shards = [s for s in shards]
        self.names = list(names)
        self.vocabs = list(vocabs) if vocabs is not None else [None] * len(self.shards)
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + int(s.shape[0]))

    def __len__(self) -> int:
        return self.offsets[-1]

    def window(self, start: int, n: int) -> np.ndarray:
        """Ids [start, start + n) as int64, across shard boundaries."""
        out = np.empty(n, dtype=np.int64)
        i = bisect.bisect_right(self.offsets, start) - 1
        got = 0
        while got < n:
            lo = start + got - self.offsets[i]
            take = min(n - got, self.offsets[i + 1] - self.offsets[i] - lo)
            out[got:got + take] = self.shards[i][lo:lo + take]
            got += take
            i += 1
        return out

    def file_of(self, position: int) -> str:
        """The file that holds stream position `position`."""
        return self.names[bisect.bisect_right(self.offsets, position) - 1]

    def check_ids(self, vocab_size: int, max_bytes: int = SCAN_BYTES) -> bool:
        """Read every shard whose ids no recorded vocabulary within `vocab_size` bounds, in chunks, and raise
        DataError naming the first id outside [0, vocab_size) (its file and stream position). Returns False,
        reading nothing, when those shards hold more than `max_bytes`: the batches still check what they read."""
        todo = [i for i, v in enumerate(self.vocabs) if v is None or v > vocab_size]
        if sum(int(self.shards[i].nbytes) for i in todo) > max_bytes:
            return False
        for i in todo:
            shard = self.shards[i]
            for lo in range(0, len(shard), SCAN_CHUNK):
                chunk = shard[lo:lo + SCAN_CHUNK]
                if int(chunk.max()) < vocab_size and (chunk.dtype.kind == "u" or int(chunk.min()) >= 0):
                    continue
                at = int(np.flatnonzero((chunk >= vocab_size) | (chunk < 0))[0])
                raise DataError(bad_id(self.names[i], int(chunk[at]), self.offsets[i] + lo + at, vocab_size))
        return True


def bad_id(name: str, token: int, position: int, vocab_size: int) -> str:
    """The one line for a token id outside the model's vocabulary."""
    return (f"{name}: token id {token} (stream position {position}) is outside the model's vocabulary of "
            f"{vocab_size} (model.vocab_size)")


def _expand(source: str, key: str = "train.data") -> list[str]:
    """The files of a source: itself, the token shards of a directory, or the matches of a glob, sorted."""
    if os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "*")) if f.endswith(TOKEN_SUFFIXES))
        if not files:
            raise DataError(f"{key}={source!r} is a directory without .bin or .npy token shards")
        return files
    if any(c in source for c in "*?["):
        files = sorted(f for f in glob.glob(source) if os.path.isfile(f))
        if not files:
            raise DataError(f"{key}={source!r} matches no file")
        return files
    if not os.path.exists(source):
        raise DataError(f"{key}={source!r}: no such file (use 'stdlib', a text file, .bin/.npy token "
                        f"files, a directory or a glob of them)")
    if not os.path.isfile(source):
        raise DataError(f"{key}={source!r} is not a file")
    return [source]


def load_npy(path: str) -> np.ndarray:
    """`.npy` file `path` memory-mapped; DataError unless it is a readable 1-D array of integer token ids."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise DataError(f"{path!r} is not a readable .npy array ({e})") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise DataError(f"{path!r} holds a {arr.dtype} array of shape {tuple(arr.shape)}; expected a 1-D "
                        f"array of integer token ids")
    return arr


def _token_shard(path: str, dtype: str) -> tuple[np.ndarray, int | None]:
    """Token file `path` memory-mapped, and the vocabulary size its description records (None if none);
    DataError when it disagrees with that description (a truncated file, another dtype)."""
    meta = read_sidecar(path)
    if path.endswith(".npy"):
        arr = load_npy(path)
        check_count(path, meta, arr.size, str(arr.dtype))
        return arr, meta.get("vocab_size")
    saved = meta.get("dtype")
    if saved and saved != dtype:
        raise DataError(f"{path!r} holds {saved} token ids (see {path}.json), but train.data_dtype is {dtype}")
    size = os.path.getsize(path)
    held, stray = divmod(size, np.dtype(DTYPES[dtype]).itemsize)
    check_count(path, meta, held, dtype, stray)
    if stray:
        raise DataError(f"{path!r} has {size} bytes, not a whole number of {dtype} token ids "
                        f"(train.data_dtype={dtype}: is the dtype right?)")
    if not saved and dtype == "uint16":
        _refuse_uint32_as_uint16(path)
    if size == 0:
        return np.zeros(0, dtype=DTYPES[dtype]), meta.get("vocab_size")
    return np.memmap(path, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<"), mode="r"), meta.get("vocab_size")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# the fields of a description that pp reads: (key, whether a value is well-formed, what is expected)
_FIELDS = (("dtype", lambda v: v in DTYPES, f"one of {', '.join(DTYPES)}"),
           ("tokens", _is_count, "a count of 0 or more token ids"),
           ("vocab_size", lambda v: _is_count(v) and v > 0, "a positive vocabulary size"),
           ("documents", _is_count, "a count of 0 or more documents"),
           ("tokenizer", lambda v: isinstance(v, str), "the path of a tokenizer.json"),
           ("tokenizer_sha256", lambda v: isinstance(v, str), "the tokenizer's sha256 in hex"))


def sidecar_fault(path: str) -> tuple[dict, str | None]:
    """(the description beside token file `path`, None), ({}, None) when there is none, or ({}, what is
    wrong with it): not readable JSON, not an object, or a field pp reads that is malformed."""
    meta_path = path + ".json"
    if not os.path.exists(meta_path):
        return {}, None
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return {}, (f"{meta_path!r} is not readable JSON ({e}); expected the description pp.data prepare "
                    f"writes beside {path!r}")
    if not isinstance(meta, dict):
        return {}, (f"{meta_path!r} holds a JSON {type(meta).__name__}; expected the object pp.data prepare "
                    f"writes beside {path!r}")
    for key, ok, expected in _FIELDS:
        if key in meta and not ok(meta[key]):
            return {}, f"{meta_path!r} records {key} {meta[key]!r}; expected {expected}"
    return meta, None


def read_sidecar(path: str) -> dict:
    """The description `pp.data prepare` writes beside token file `path` (`<path>.json`: dtype, tokens,
    vocab_size, tokenizer, ...), {} when there is none; DataError naming it when it is malformed."""
    meta, fault = sidecar_fault(path)
    if fault:
        raise DataError(f"{fault}: {REDO}")
    return meta


def count_fault(path: str, meta: dict, held: int, dtype: str, stray: int = 0) -> str | None:
    """What is wrong where token file `path`, holding `held` ids of `dtype` (and `stray` bytes more), does
    not hold the count its description `meta` records; None where it does or none is recorded."""
    tokens = meta.get("tokens")
    if tokens is None or (tokens == held and not stray):
        return None
    extra = f" and {stray} stray byte(s)" if stray else ""
    return f"{path!r} holds {held:,} {dtype} token ids{extra}, but {path + '.json'!r} records {tokens:,}"


def check_count(path: str, meta: dict, held: int, dtype: str, stray: int = 0) -> None:
    """DataError (see `count_fault`) unless token file `path` holds the count its description records."""
    fault = count_fault(path, meta, held, dtype, stray)
    if fault:
        raise DataError(f"{fault} (truncated, or changed since pp.data prepare wrote it): {REDO}")


def recorded_vocab(source: str) -> tuple[str, int] | None:
    """(shard, vocab size) of the largest tokenizer vocabulary that `pp.data prepare` recorded next to
    `source`'s token shards (`<file>.json`), or None where none is recorded (or the source is not
    token shards); DataError for a malformed description. Cheap: it reads the small JSON files, never
    the shards."""
    if source == STDLIB:
        return None
    try:
        files = [f for f in _expand(source) if f.endswith(TOKEN_SUFFIXES)]
    except DataError:
        return None
    best = None
    for f in files:
        vocab = read_sidecar(f).get("vocab_size")
        if vocab is not None and (best is None or vocab > best[1]):
            best = (f, vocab)
    return best


def looks_like_uint32(path: str, sample_bytes: int = 1 << 16) -> bool:
    """Whether `.bin` file `path` looks like uint32 ids: read as uint16, the ids' high halves sit at every
    odd position, all 0 while the vocabulary is below 65,536 and at most 3 below 262,144, while the low
    halves go higher. Natural uint16 token text never looks like that (reads at most `sample_bytes`)."""
    size = os.path.getsize(path)
    if size % 4 or size < 64:
        return False
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(min(size, sample_bytes)), dtype="<u2")
    return int(head[1::2].max()) <= 3 < int(head[0::2].max())


def _refuse_uint32_as_uint16(path: str) -> None:
    """Refuse a file that looks like uint32 ids under train.data_dtype uint16: it would train on garbage
    ids without a word. A `<file>.json` sidecar recording the dtype (as `pp.data prepare` writes) skips it."""
    if looks_like_uint32(path):
        raise DataError(f"{path!r} looks like uint32 token ids (every second uint16 is 0-3) but "
                        f"train.data_dtype is uint16: set train.data_dtype: uint32, or if the file really "
                        f"holds uint16 ids, record it in {path + '.json'} as {{\"dtype\": \"uint16\"}}")


def open_stream(source: str, dtype: str = "uint16", tokenizer: str | None = None,
                seq_len: int | None = None, key: str = "train.data") -> TokenStream:
    """The token stream of `train.data` (see the module docstring); raises DataError naming what is wrong
    (the source as the config key `key`, e.g. `eval.data`).

    `dtype` is the id type of `.bin` files (`uint16` or `uint32`); `tokenizer`, a tokenizer.json, makes
    text and `.jsonl` files token streams (cached); without it a text file is read as bytes.
    """
    if dtype not in DTYPES:
        raise DataError(f"train.data_dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if source == STDLIB:
        chunks = []
        for path in stdlib_files():
            with open(path, "rb") as f:
                chunks.append(f.read())
        data = np.frombuffer(b"\n".join(chunks), dtype=np.uint8)
        stream = TokenStream([data], ["<stdlib>"], [256])
    else:
        files = _expand(source, key)
        tokens = [f for f in files if f.endswith(TOKEN_SUFFIXES)]
        if tokens and len(tokens) != len(files):
            raise DataError(f"{key}={source!r} mixes token files with other files: "
                            f"{[f for f in files if f not in tokens][:3]}")
        if tokens:
            shards, vocabs = zip(*[_token_shard(f, dtype) for f in files])
            stream = TokenStream(shards, files, vocabs)
        elif tokenizer:
            from .tokenize import cached_tokens

            shards, vocabs = zip(*[cached_tokens(f, tokenizer) for f in files])
            stream = TokenStream(shards, files, vocabs)
        else:
            if any(f.endswith(".jsonl") for f in files):
                raise DataError(f"{key}={source!r} is .jsonl: name a tokenizer.json in train.tokenizer")
            stream = TokenStream([np.memmap(f, dtype=np.uint8, mode="r") if os.path.getsize(f) else
                                  np.zeros(0, np.uint8) for f in files], files, [256] * len(files))
    if seq_len is not None and len(stream) < seq_len + 1:
        raise DataError(f"{key}={source!r} has {len(stream)} tokens, fewer than model.seq_len + 1 = "
                        f"{seq_len + 1}")
    return stream
