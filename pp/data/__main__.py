"""`python -m pp.data prepare INPUT... --tokenizer tok.json -o OUT.bin` and `python -m pp.data inspect OUT.bin`.

prepare: text / .jsonl files (field `text`) -> one file of little-endian token ids, an end-of-text token
after every document, tokenized in parallel over files, with a progress bar and a summary; the id dtype
is uint16 while the vocabulary fits, else uint32, and is recorded in `OUT.bin.json`.
inspect: size, token count, dtype, largest id and a decoded sample of a token file.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .prepare import prepare
from .stream import DTYPES, DataError, check_count, load_npy, looks_like_uint32, read_sidecar
from .tokenize import load_tokenizer


def inspect(path: str, tokenizer: str | None, dtype: str | None, sample: int) -> list[str]:
    """Lines describing token file `path`: size, tokens, dtype, largest id, a decoded sample."""
    if sample < 0:
        raise DataError(f"--sample {sample}: expected 0 or more ids to show")
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a directory; expected a .bin or .npy token file")
    if not os.path.isfile(path):
        raise DataError(f"{path!r}: no such file")
    meta = read_sidecar(path)
    if path.endswith(".npy"):
        ids = load_npy(path)
        dtype = str(ids.dtype)
        check_count(path, meta, ids.size, dtype)
    else:
        dtype = dtype or meta.get("dtype") or "uint16"
        if dtype not in DTYPES:
            raise DataError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        recorded = meta.get("dtype") or dtype   # the count a description records is of its own dtype
        held, stray = divmod(os.path.getsize(path), np.dtype(recorded).itemsize)
        check_count(path, meta, held, recorded, stray)
        if os.path.getsize(path) % np.dtype(dtype).itemsize:
            raise DataError(f"{path!r} has {os.path.getsize(path)} bytes, not a whole number of {dtype} ids")
        ids = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") if os.path.getsize(path) else None
    if ids is None or not ids.size:
        raise DataError(f"{path!r} is empty; expected a file of token ids")
    lines = [f"{path}: {os.path.getsize(path):,} bytes, {ids.size:,} tokens of {dtype}"]
    if dtype == "uint16" and not meta.get("dtype") and looks_like_uint32(path):
        lines.append("warning: every second id is 0-3, as uint32 ids read as uint16 look: try --dtype uint32")
    top = max(int(ids[i:i + (1 << 24)].max()) for i in range(0, ids.size, 1 << 24))
    vocab = meta.get("vocab_size")
    lines.append(f"largest id: {top}" + (f" (vocabulary {vocab})" if vocab is not None else ""))
    if meta.get("documents") is not None:
        lines.append(f"documents: {meta['documents']:,}")
    head = [int(i) for i in ids[:sample]]
    lines.append(f"first {len(head)} ids: {head}")
    if tokenizer:
        tok = load_tokenizer(tokenizer)
        lines.append("decoded: " + repr(tok.decode(head, skip_special_tokens=False)))
    return lines


def _os_error(e: OSError) -> str:
    """One line for an OSError while reading or writing files: the file and the reason."""
    reason = e.strerror or str(e) or type(e).__name__
    return f"cannot use {e.filename!r}: {reason}" if e.filename else reason


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pp.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize text / .jsonl files into a token file")
    p.add_argument("inputs", nargs="+", help="text files (one document each) or .jsonl files (one per line, field 'text')")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json")
    p.add_argument("-o", "--output", required=True, help="the token file to write, e.g. data/train.bin")
    p.add_argument("--eot", default=None, help="end-of-text token put after every document (default: the "
                                               "tokenizer's <|endoftext|>, </s>, <eos>, ...)")
    p.add_argument("--workers", type=int, default=0, help="processes (default: one per file, at most the CPUs)")
    q = sub.add_parser("inspect", help="describe a token file")
    q.add_argument("path")
    q.add_argument("--tokenizer", default=None, help="decode a sample with this tokenizer.json")
    q.add_argument("--dtype", default=None, help="uint16 or uint32 (default: from PATH.json, else uint16)")
    q.add_argument("--sample", type=int, default=32, help="ids to show and decode")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            workers = args.workers or min(len(args.inputs), os.cpu_count() or 1)
            if workers < 1:
                raise DataError(f"--workers {args.workers}: expected a positive number")
            s = prepare(args.inputs, args.tokenizer, args.output, args.eot, workers)
            print(f"pp.data: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}: set "
                  f"train.data_dtype: {s['dtype']}) from {s['bytes_in']:,} bytes in {s['seconds']:.1f}s -> {args.output}")
        else:
            for line in inspect(args.path, args.tokenizer, args.dtype, args.sample):
                print(line)
    except DataError as e:
        print(f"pp.data: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a file that cannot be read or written: permissions, disk full
        print(f"pp.data: {_os_error(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
