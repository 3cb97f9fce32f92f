"""What rank 0 shows while training: a live progress bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO

from .metrics import format_rate


def log_line(step: int, total: int, loss: float, lr: float, tok_s: float, step_s: float) -> str:
    """nanoGPT-style: `step 10/30 loss 4.1200 lr 3.0e-03 12.3k tok/s 0.21s`."""
    return f"step {step}/{total} loss {loss:.4f} lr {lr:.1e} {format_rate(tok_s)} tok/s {step_s:.2f}s"


class Progress:
    """Shows one step at a time; `tty=None` asks the stream whether it is a terminal."""

    def __init__(self, total: int, first_step: int, log_every: int, stream: TextIO | None = None,
                 tty: bool | None = None, width: int = 24):
        self.total = total
        self.first_step = first_step
        self.log_every = log_every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.width = width
        self.t0 = time.perf_counter()
        self._open_line = False

    def update(self, step: int, loss: float, lr: float, tok_s: float, step_s: float) -> None:
        if self.tty:
            self._bar(step, loss, lr, tok_s)
        elif step % self.log_every == 0 or step in (self.first_step, self.total):
            self.print(log_line(step, self.total, loss, lr, tok_s, step_s))

    def _bar(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        done = (step - self.first_step + 1) / max(1, self.total - self.first_step + 1)
        filled = int(round(self.width * done))
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1e-9) - elapsed
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{step}/{self.total} [{bar}] loss {loss:.4f} lr {lr:.1e} "
                          f"{format_rate(tok_s)} tok/s eta {eta:.0f}s ")
        self.stream.flush()
        self._open_line = True

    def print(self, text: str) -> None:
        """A message of its own line (ends a live bar first)."""
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
