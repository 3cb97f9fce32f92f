"""Text to token ids with a Hugging Face `tokenizers` tokenizer.json: documents, end-of-text tokens, shards.

Used by `python -m pp.data prepare` and by `train.data: corpus.jsonl` + `train.tokenizer: tok.json`, which
tokenizes once and caches the ids next to the data, keyed by the tokenizer's hash.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import warnings
from typing import Iterator

import numpy as np

from .stream import DTYPES, STDLIB, TOKEN_SUFFIXES, DataError, _expand, count_fault, read_sidecar, sidecar_fault

EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eot_id|>", "<eot>", "[SEP]", "<|end_of_text|>")
CHUNK_BYTES = 1 << 20


def load_tokenizer(path: str):
    """The `tokenizers.Tokenizer` of `path`; DataError when the package or the file is missing or bad."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError("tokenized data needs the tokenizers package: pip install 'pp[data]'") from None
    if not os.path.isfile(path):
        raise DataError(f"tokenizer {path!r}: no such file (expected a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions for bad files
        raise DataError(f"tokenizer {path!r} is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_tokenizer(source: str, tokenizer: str, key: str = "train.data") -> str | None:
    """`tokenizer` (train.tokenizer) given with data `source`: DataError when a token file of `source` was
    prepared with another tokenizer (compared by content: the sha256 its description records, or the file it
    names); for token files that record none, the note that `tokenizer` goes unused; None otherwise."""
    files = [] if source == STDLIB else [f for f in _expand(source, key) if f.endswith(TOKEN_SUFFIXES)]
    if not files:
        return None   # text: the tokenizer tokenizes it
    sha, compared = file_sha256(tokenizer), False
    for f in files:
        meta = read_sidecar(f)
        theirs, named = meta.get("tokenizer_sha256"), meta.get("tokenizer")
        if theirs is None and named is not None and os.path.isfile(named):
            theirs = file_sha256(named)
        if theirs is None:
            continue
        if theirs != sha:
            raise DataError(f"train.tokenizer={tokenizer!r} differs from the tokenizer {named or theirs[:12]!r} that "
                            f"{f!r} was prepared with (see {f}.json): name that one, or leave train.tokenizer out")
        compared = True
    if compared:
        return None
    return (f"train.tokenizer={tokenizer!r} is unused: {key}={source!r} holds token ids already (pre-tokenized), "
            f"and no tokenizer is recorded beside them")


def eot_id(tok, name: str | None = None) -> int:
    """The id of the end-of-text token put between documents: `name`, or the first known one present."""
    names = [name] if name else list(EOT_CANDIDATES)
    for n in names:
        i = tok.token_to_id(n)
        if i is not None:
            return int(i)
    if name:
        raise DataError(f"the tokenizer has no token {name!r} (--eot)")
    raise DataError(f"the tokenizer has none of the end-of-text tokens {', '.join(EOT_CANDIDATES)}; name one with --eot")


def dtype_for(vocab_size: int) -> str:
    """uint16 while every id fits (vocab ≤ 65,536, nanoGPT's layout), else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def documents(path: str) -> Iterator[str]:
    """A `.jsonl` file's `text` fields, one document per line; any other file is one document, in chunks
    of whole lines (so a large file is never read whole)."""
    if path.endswith(".jsonl"):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{n} is not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise DataError(f"{path}:{n} is not a JSON object") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f"{path}:{n} has no string field 'text'")
                yield rec["text"]
        return
    yield from _chunks(path)


def _chunks(path: str) -> Iterator[str]:
    """Marker-free: the caller treats the chunks of a plain file as one document."""
    buf: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= CHUNK_BYTES:
                yield _Chunk("".join(buf))
                buf, size = [], 0
    if buf:
        yield _Chunk("".join(buf))


class _Chunk(str):
    """A piece of a plain-text document (no end-of-text token after it, except after the last)."""


def tokenize_file(path: str, tokenizer_path: str, eot: int, progress=None) -> tuple[np.ndarray, int]:
    """All ids of `path` with `eot` after each document; returns (ids as int64, documents).

    `progress(n_bytes, n_tokens)`, if given, is called after each batch of documents."""
    tok = load_tokenizer(tokenizer_path)
    parts: list[np.ndarray] = []
    docs = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal docs
        if not batch:
            return
        n_bytes = n_tokens = 0
        for text, enc in zip(batch, tok.encode_batch(list(batch), add_special_tokens=False)):
            parts.append(np.asarray(enc.ids, dtype=np.int64))
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(enc.ids)
            if not isinstance(text, _Chunk):
                parts.append(np.array([eot], dtype=np.int64))
                docs += 1
        batch.clear()
        if progress is not None:
            progress(n_bytes, n_tokens)

    for text in documents(path):
        batch.append(text)
        if len(batch) >= 256:
            flush()
    flush()
    if not path.endswith(".jsonl"):
        parts.append(np.array([eot], dtype=np.int64))
        docs += 1
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), docs


def cached_tokens(path: str, tokenizer_path: str) -> tuple[np.ndarray, int]:
    """The ids of text/jsonl file `path` under `tokenizer_path`, and the tokenizer's vocabulary size; the
    ids are tokenized once and cached next to `path` as `<path>.<tokenizer sha256[:12]>.bin` (+ `.json`);
    concurrent ranks wait for the first to finish. The cache is used while `path` has the size and
    modification time (ns) recorded with it: a file replaced by another, even one with an older time
    (`cp -p`, `tar x`, `rsync -t`), is tokenized again. A cache that disagrees with its description (a
    truncated file, a damaged `.json`) is tokenized again too, with a warning: pp made it, pp remakes it."""
    tok = load_tokenizer(tokenizer_path)
    key = file_sha256(tokenizer_path)[:12]
    cache = f"{path}.{key}.bin"
    vocab = tok.get_vocab_size()
    dtype = dtype_for(vocab)
    with _locked(cache + ".lock"):
        st = os.stat(path)
        source = {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}
        fault = _cache_fault(cache, source, dtype)
        if fault is not None:
            if fault:
                warnings.warn(f"the token cache {cache!r} is unusable ({fault}): tokenizing {path!r} again")
            ids, docs = tokenize_file(path, tokenizer_path, eot_id(tok))
            write_tokens(cache, ids, dtype, {"documents": docs, "tokenizer": os.path.abspath(tokenizer_path),
                                             "tokenizer_sha256": file_sha256(tokenizer_path),
                                             "vocab_size": vocab, "source": os.path.abspath(path), **source})
    if os.path.getsize(cache) == 0:
        return np.zeros(0, dtype=np.dtype(dtype)), vocab
    return np.memmap(cache, dtype=np.dtype(dtype).newbyteorder("<"), mode="r"), vocab


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on file `path` (made if missing) across processes, and remove the file when
    done, while still holding it. A process that waited on a lock file removed meanwhile locks again, on the
    file now at `path`, so two processes never both hold the lock and no `.lock` file is left behind."""
    while True:
        f = open(path, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            st, held = os.stat(path), os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        f.close()


def _cache_fault(cache: str, source: dict, dtype: str) -> str | None:
    """Whether token cache `cache` can be used for the text file described by `source` (its size and
    modification time): None if so; '' if it was never made or the text file changed since; else what is
    wrong with it (a damaged or missing description, a count or dtype other than it records)."""
    if not os.path.exists(cache):
        return ""
    meta, fault = sidecar_fault(cache)
    if fault:
        return fault
    if not meta:
        return f"{cache + '.json'!r}, its description, is missing"
    if any(meta.get(k) != v for k, v in source.items()):
        return ""
    if meta.get("dtype") != dtype or "tokens" not in meta:
        return (f"{cache + '.json'!r} records dtype {meta.get('dtype')!r} and tokens {meta.get('tokens')!r}; "
                f"expected {dtype} and a count")
    held, stray = divmod(os.path.getsize(cache), np.dtype(DTYPES[dtype]).itemsize)
    return count_fault(cache, meta, held, dtype, stray)


def written_paths(path: str) -> list[str]:
    """Every file `write_tokens(path, ...)` writes: the ids, their `.json` description and both temp files."""
    return [path, path + ".json", path + ".tmp", path + ".json.tmp"]


def write_tokens(path: str, ids: np.ndarray, dtype: str, meta: dict) -> None:
    """Write ids little-endian as `dtype` to `path` atomically, with `<path>.json` describing them; the temp
    files are removed whatever happens (an OSError, disk full or a bad path, is left to the caller)."""
    _, _, tmp, meta_tmp = written_paths(path)
    try:
        little = ids.astype(np.dtype(dtype).newbyteorder("<"))
        if path.endswith(".npy"):        # a real .npy (its header gives the dtype), as pp.run reads one
            with open(tmp, "wb") as f:
                np.save(f, little)
        else:
            little.tofile(tmp)
        with open(meta_tmp, "w") as f:
            json.dump({"dtype": dtype, "tokens": int(ids.size), **meta}, f, indent=1)
        os.replace(tmp, path)
        os.replace(meta_tmp, path + ".json")
    finally:
        for leftover in (tmp, meta_tmp):
            with contextlib.suppress(OSError):
                os.remove(leftover)
