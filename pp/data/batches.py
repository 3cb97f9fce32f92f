"""The batch of a step: random windows of a token stream, a pure function of (seed, step).

A resumed run therefore reads exactly the batches it would have read, and only the ranks that need
tokens (first stage) or targets (last stage) read at all.
"""
from __future__ import annotations

import numpy as np
import torch

from .stream import DataError, TokenStream, bad_id


class TokenBatches:
    """`tokens(step)`, `targets(step)`: (batch_size, seq_len) int64 tensors, targets shifted by one token.

    Windows of seq_len + 1 tokens start in [lo, hi - seq_len] of the stream (the last one ends at
    the region's last token) (a region: the training part, or a held-out
    tail for evaluation). `salt` separates the draws of two uses of one seed (training, evaluation).
    With `vocab_size`, an id outside [0, vocab_size) raises DataError naming its file.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int, *, lo: int = 0,
                 hi: int | None = None, vocab_size: int | None = None, salt: int = 0):
        hi = len(stream) if hi is None else hi
        if hi - lo < seq_len + 1:
            raise DataError(f"the data region [{lo}, {hi}) has {hi - lo} tokens, fewer than seq_len + 1 = "
                            f"{seq_len + 1}")
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self.lo, self.hi, self.vocab_size, self.salt = lo, hi, vocab_size, salt
        self._cache: tuple[int, torch.Tensor] | None = None

    def starts(self, step: int) -> torch.Tensor:
        """Window start offsets of `step`, from a generator seeded by (seed, step, salt) alone."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step + self.salt * 7_919_000_003)
        return torch.randint(self.lo, self.hi - self.seq_len, (self.batch_size,), generator=g)

    def _windows(self, step: int) -> torch.Tensor:
        if self._cache is not None and self._cache[0] == step:
            return self._cache[1]
        starts = self.starts(step).tolist()
        rows = np.stack([self.stream.window(s, self.seq_len + 1) for s in starts])
        if self.vocab_size is not None:
            self._check_ids(rows, starts)
        win = torch.from_numpy(rows)
        self._cache = (step, win)
        return win

    def _check_ids(self, rows: np.ndarray, starts: list[int]) -> None:
        bad = (rows >= self.vocab_size) | (rows < 0)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            pos = starts[r] + int(c)
            raise DataError(bad_id(self.stream.file_of(pos), int(rows[r, c]), pos, self.vocab_size))

    def check(self, steps: int) -> None:
        """Read the windows of steps 0 .. steps - 1 now, so that a bad id among them raises DataError before
        training (evaluation reads these same batches every time)."""
        for step in range(steps):
            self._windows(step)

    def tokens(self, step: int) -> torch.Tensor:
        return self._windows(step)[:, :-1].contiguous()

    def targets(self, step: int) -> torch.Tensor:
        return self._windows(step)[:, 1:].contiguous()

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens(step), self.targets(step)
