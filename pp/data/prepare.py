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
from .tokenize import dtype_for, eot_id, load_tokenizer, tokenize_file, write_tokens

_queue = None


def _init(queue) -> None:
    global _queue
    _queue = queue


def _work(args: tuple[str, str, int]) -> tuple[str, np.ndarray, int]:
    path, tokenizer, eot = args
    ids, docs = tokenize_file(path, tokenizer, eot, progress=lambda b, t: _queue.put((b, t)))
    return path, ids, docs


def prepare(inputs: list[str], tokenizer: str, out: str, eot: str | None, workers: int) -> dict:
    """Tokenize `inputs` into `out`; returns the summary (documents, tokens, dtype, seconds)."""
    for path in inputs:
        if not os.path.isfile(path):
            raise DataError(f"input {path!r}: no such file")
    tok = load_tokenizer(tokenizer)
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
    ids = np.concatenate([results[p][0] for p in inputs]) if inputs else np.zeros(0, np.int64)
    docs = sum(results[p][1] for p in inputs)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_tokens(out, ids, dtype, {"documents": docs, "vocab_size": tok.get_vocab_size(), "eot_id": eot_token,
                                   "tokenizer": os.path.abspath(tokenizer), "inputs": [os.path.abspath(p) for p in inputs]})
    return {"documents": docs, "tokens": int(ids.size), "dtype": dtype, "bytes_in": total,
            "seconds": time.perf_counter() - t0}


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


