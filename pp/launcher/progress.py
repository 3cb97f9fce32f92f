"""What rank 0 shows while training: a tqdm progress bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
from typing import TextIO

from .metrics import format_rate


def log_line(step: int, total: int, loss: float, lr: float, tok_s: float, step_s: float) -> str:
    """nanoGPT-style: `step 10/30 loss 4.1200 lr 3.0e-03 12.3k tok/s 0.21s`."""
    return f"step {step}/{total} loss {loss:.4f} lr {lr:.1e} {format_rate(tok_s)} tok/s {step_s:.2f}s"


class Progress:
    """Shows one step at a time; `tty=None` asks the stream whether it is a terminal.

    On a terminal: a tqdm bar (steps, rate, ETA) whose postfix has the loss, lr, tokens/s and the latest
    validation loss; messages print above it. Otherwise: a log line every `log_every` steps (and the first
    and last step), and the validation loss on a line of its own.
    """

    def __init__(self, total: int, first_step: int, log_every: int, stream: TextIO | None = None,
                 tty: bool | None = None):
        self.total = total
        self.first_step = first_step
        self.log_every = log_every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.val: str = ""
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=first_step - 1, file=self.stream, unit="step",
                             dynamic_ncols=True, leave=True, mininterval=0)

    def update(self, step: int, loss: float, lr: float, tok_s: float, step_s: float) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.1e} {format_rate(tok_s)} tok/s{self.val}",
                                      refresh=False)
            self._bar.update(step - self._bar.n)
        elif step % self.log_every == 0 or step in (self.first_step, self.total):
            self.print(log_line(step, self.total, loss, lr, tok_s, step_s))

    def validation(self, step: int, val_loss: float, val_ppl: float) -> None:
        """Show an evaluation's result: in the bar's postfix and on a line of its own."""
        self.val = f" val {val_loss:.4f}"
        self.print(f"step {step}/{self.total} val_loss {val_loss:.4f} val_ppl {val_ppl:.2f}")

    def print(self, text: str) -> None:
        """A message on its own line (above a live bar)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
