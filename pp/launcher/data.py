"""Byte-level training data: a corpus present on every machine, and batches that depend only on (seed, step).

The default corpus is the running Python's own standard library: every `*.py` file directly in
`sysconfig.get_paths()["stdlib"]`, in sorted order, concatenated as bytes. `train.data: file.txt`
uses that file instead. Because a batch is a pure function of the seed and the step number, a resumed
run reads exactly the batches it would have read, and only the ranks that need tokens or targets read.
"""
from __future__ import annotations

import glob
import os
import sysconfig

import torch

STDLIB = "stdlib"


def stdlib_files() -> list[str]:
    """The fixed, sorted list of files the default corpus is made of."""
    root = sysconfig.get_paths()["stdlib"]
    return sorted(glob.glob(os.path.join(root, "*.py")))


def load_corpus(source: str) -> torch.Tensor:
    """All bytes of the corpus as a uint8 tensor."""
    if source == STDLIB:
        chunks = []
        for path in stdlib_files():
            with open(path, "rb") as f:
                chunks.append(f.read())
        data = b"\n".join(chunks)
    else:
        with open(source, "rb") as f:
            data = f.read()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class ByteBatches:
    """Random windows of the corpus: `batch(step)` gives (tokens, targets), targets shifted by one byte."""

    def __init__(self, corpus: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if corpus.numel() < seq_len + 1:
            raise ValueError(f"the corpus has {corpus.numel()} bytes, fewer than seq_len + 1 = {seq_len + 1}")
        self.corpus = corpus
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed

    def starts(self, step: int) -> torch.Tensor:
        """Window start offsets of `step`, from a generator seeded by (seed, step) alone."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(0, self.corpus.numel() - self.seq_len, (self.batch_size,), generator=g)

    def _windows(self, step: int, shift: int) -> torch.Tensor:
        idx = self.starts(step)[:, None] + torch.arange(self.seq_len)[None, :] + shift
        return self.corpus[idx].long()

    def tokens(self, step: int) -> torch.Tensor:
        return self._windows(step, 0)

    def targets(self, step: int) -> torch.Tensor:
        return self._windows(step, 1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens(step), self.targets(step)
