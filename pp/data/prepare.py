"""`pp.data prepare`: text / .jsonl files -> one file of token ids, tokenized in parallel over files.

The worker functions live here (not in `__main__`) so that spawned processes can import them.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time

import numpy as np

from .stream import DataError
from .tokenize import dtype_for, eot_id, file_sha256, load_tokenizer, tokenize_file, write_tokens, written_paths

_queue = None


def _init(queue) -> None:
    global _queue
    _queue = queue


def _work(args: tuple[str, str, int]) -> tuple[str, np.ndarray, int]:
    path, tokenizer, eot = args
    ids, docs = tokenize_file(path, tokenizer, eot, progress=lambda b, t: _queue.put((b, t)))
    return path, ids, docs


def prepare(inputs: list[str], tokenizer: str, out: str, eot: str | None, workers: int) -> dict:
    """Tokenize `inputs` into `out`; returns the summary (documents, tokens, dtype, seconds). Bad inputs and
    an `out` that cannot be written, or would overwrite an input or the tokenizer, are refused (DataError)
    before anything is tokenized or written."""
    check_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    check_output(out, inputs, tokenizer)
    eot_token = eot_id(tok, eot)
    dtype = dtype_for(tok.get_vocab_size())
    total = sum(os.path.getsize(p) for p in inputs)
    t0 = time.perf_counter()
    bar = _bar(total)
    results: dict[str, tuple[np.ndarray, int]] = {}
    tokens_seen = 0
    ctx = mp.get_context("spawn")
    queue = ctx.Manager().Queue() if workers > 1 else None
    if workers > 1:
        with ctx.Pool(workers, initializer=_init, initargs=(queue,)) as pool:
            pending = pool.imap_unordered(_work, [(p, tokenizer, eot_token) for p in inputs])
            done = 0
            while done < len(inputs):
                try:
                    path, ids, docs = pending.next(timeout=0.2)
                    results[path] = (ids, docs)
                    done += 1
                except mp.TimeoutError:
                    pass
                while not queue.empty():
                    b, t = queue.get()
                    tokens_seen += t
                    _advance(bar, b, tokens_seen, t0)
            while not queue.empty():
                b, t = queue.get()
                tokens_seen += t
                _advance(bar, b, tokens_seen, t0)
    else:
        def progress(b: int, t: int) -> None:
            nonlocal tokens_seen
            tokens_seen += t
            _advance(bar, b, tokens_seen, t0)
        for path in inputs:
            results[path] = tokenize_file(path, tokenizer, eot_token, progress=progress)
    if bar is not None:
        bar.close()
    for path in inputs:
        if not results[path][1]:
            raise DataError(f"input {path!r} has no documents (expected lines of JSON objects with a 'text' field)")
    ids = np.concatenate([results[p][0] for p in inputs]) if inputs else np.zeros(0, np.int64)
    docs = sum(results[p][1] for p in inputs)
    parent = os.path.dirname(os.path.abspath(out))
    created = []   # the directories made for `out`, deepest last: removed again if writing fails
    while not os.path.exists(parent):
        created.insert(0, parent)
        parent = os.path.dirname(parent)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        write_tokens(out, ids, dtype, {"documents": docs, "vocab_size": tok.get_vocab_size(), "eot_id": eot_token,
                                       "tokenizer": os.path.abspath(tokenizer),
                                       "tokenizer_sha256": file_sha256(tokenizer),
                                       "inputs": [os.path.abspath(p) for p in inputs]})
    except BaseException:
        for d in reversed(created):
            try:
                os.rmdir(d)       # only while empty: nothing another process put there is touched
            except OSError:
                break
        raise
    return {"documents": docs, "tokens": int(ids.size), "dtype": dtype, "bytes_in": total,
            "seconds": time.perf_counter() - t0}


def check_inputs(inputs: list[str]) -> None:
    """Refuse an input that is missing, not a file, or empty (it would be one empty document: only an
    end-of-text token)."""
    for path in inputs:
        if os.path.isdir(path):
            raise DataError(f"input {path!r} is a directory; expected a text or .jsonl file")
        if not os.path.isfile(path):
            raise DataError(f"input {path!r}: no such file")
        if os.path.getsize(path) == 0:
            raise DataError(f"input {path!r} is empty; expected a text or .jsonl file with documents")


def check_output(out: str, inputs: list[str], tokenizer: str) -> None:
    """Refuse an `out` that is a directory, lies under a file or an unwritable directory, or whose ids,
    sidecar or temp files (`written_paths`) are an input or the tokenizer."""
    if not os.path.basename(out) or os.path.isdir(out):
        raise DataError(f"-o {out!r} names a directory; expected a token file name such as data/train.bin")
    sources = [("input", p) for p in inputs] + [("tokenizer", tokenizer)]
    for path in written_paths(out):
        for what, source in sources:
            if _same_file(path, source):
                via = "" if path == out else f" with the {path[len(out):]} file it writes beside the ids"
                raise DataError(f"-o {out!r} would overwrite the {what} {source!r}{via}; expected a new token file "
                                f"such as data/train.bin")
        if os.path.isdir(path):
            raise DataError(f"-o {out!r} would write {path!r}, which is a directory; expected another file name")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise DataError(f"-o {out!r} lies under {parent!r}, which is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"-o {out!r} cannot be written: no permission to write in {parent!r}")
    if not out.endswith((".bin", ".npy")):
        raise DataError(f"-o {out!r}: expected a token file name ending in .bin or .npy, such as data/train.bin "
                        f"(train.data reads a file of another name as text)")


def _same_file(a: str, b: str) -> bool:
    """Whether paths `a` and `b` name one file: the same real path, or a hard link."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _bar(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing", file=sys.stderr,
                disable=None)


def _advance(bar, n_bytes: int, tokens: int, t0: float) -> None:
    if bar is None:
        return
    bar.update(n_bytes)
    rate = tokens / max(time.perf_counter() - t0, 1e-9)
    bar.set_postfix_str(f"{tokens:,} tokens, {rate:,.0f} tok/s", refresh=False)


