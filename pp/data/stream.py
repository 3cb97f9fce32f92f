"""A token stream: one long sequence of token ids, read as windows, never loaded whole.

Sources (`train.data`): `stdlib` (this Python's standard library sources, as bytes), a text file (its
bytes, memory-mapped), a `.bin` file of little-endian token ids (nanoGPT's layout; dtype uint16 or
uint32) or a `.npy` array, a directory or glob of such shards (one stream, in sorted order), or a text /
`.jsonl` file with a tokenizer (tokenized once, cached next to the data; see `pp.data.tokenize`).
"""
from __future__ import annotations

import bisect
import glob
import os
import sysconfig
from typing import Sequence

import numpy as np

STDLIB = "stdlib"
TOKEN_SUFFIXES = (".bin", ".npy")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


class DataError(ValueError):
    """The data cannot be used as asked; the message is one line naming the file and what was expected."""


def stdlib_files() -> list[str]:
    """The fixed, sorted list of files the default corpus is made of."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


class TokenStream:
    """Shards of token ids read as one sequence. `window(start, n)` -> int64 array of n ids.

    `shards` are 1-D numpy arrays (usually memory maps) and `names` the files they come from, used to name
    the file of a bad token id.
    """

    def __init__(self, shards: Sequence[np.ndarray], names: Sequence[str]):
        self.shards = [s for s in shards]
        self.names = list(names)
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


def _token_shard(path: str, dtype: str) -> np.ndarray:
    if path.endswith(".npy"):
        return load_npy(path)
    size = os.path.getsize(path)
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    if size % itemsize:
        raise DataError(f"{path!r} has {size} bytes, not a whole number of {dtype} token ids "
                        f"(train.data_dtype={dtype}: is the dtype right?)")
    if not _check_meta(path, dtype) and dtype == "uint16":
        _refuse_uint32_as_uint16(path)
    if size == 0:
        return np.zeros(0, dtype=DTYPES[dtype])
    return np.memmap(path, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<"), mode="r")


def recorded_vocab(source: str) -> tuple[str, int] | None:
    """(shard, vocab size) of the largest tokenizer vocabulary that `pp.data prepare` recorded next to
    `source`'s token shards (`<file>.json`), or None where none is recorded (or the source is not
    token shards). Cheap: it reads the small JSON files, never the shards."""
    import json

    if source == STDLIB:
        return None
    try:
        files = [f for f in _expand(source) if f.endswith(TOKEN_SUFFIXES)]
    except DataError:
        return None
    best = None
    for f in files:
        try:
            with open(f + ".json") as fh:
                vocab = json.load(fh).get("vocab_size")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(vocab, int) and (best is None or vocab > best[1]):
            best = (f, vocab)
    return best


def _check_meta(path: str, dtype: str) -> bool:
    """`pp.data prepare` writes `<file>.json` with the dtype it chose: a different train.data_dtype is an
    error. True when the sidecar records the dtype (and it is `dtype`)."""
    import json

    meta = path + ".json"
    if os.path.exists(meta):
        try:
            with open(meta) as f:
                saved = json.load(f).get("dtype")
        except (OSError, ValueError, AttributeError):
            return False
        if saved and saved != dtype:
            raise DataError(f"{path!r} holds {saved} token ids (see {meta}), but train.data_dtype is {dtype}")
        return bool(saved)
    return False


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
        stream = TokenStream([data], ["<stdlib>"])
    else:
        files = _expand(source, key)
        tokens = [f for f in files if f.endswith(TOKEN_SUFFIXES)]
        if tokens and len(tokens) != len(files):
            raise DataError(f"{key}={source!r} mixes token files with other files: "
                            f"{[f for f in files if f not in tokens][:3]}")
        if tokens:
            stream = TokenStream([_token_shard(f, dtype) for f in files], files)
        elif tokenizer:
            from .tokenize import cached_tokens

            stream = TokenStream([cached_tokens(f, tokenizer) for f in files], files)
        else:
            if any(f.endswith(".jsonl") for f in files):
                raise DataError(f"{key}={source!r} is .jsonl: name a tokenizer.json in train.tokenizer")
            stream = TokenStream([np.memmap(f, dtype=np.uint8, mode="r") if os.path.getsize(f) else
                                  np.zeros(0, np.uint8) for f in files], files)
    if seq_len is not None and len(stream) < seq_len + 1:
        raise DataError(f"{key}={source!r} has {len(stream)} tokens, fewer than model.seq_len + 1 = "
                        f"{seq_len + 1}")
    return stream
