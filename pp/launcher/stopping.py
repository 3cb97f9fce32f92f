"""Stop signals: a worker told to stop (SIGTERM from torchrun, Slurm's USR1) finishes its step and saves.

The handler only records the signal. The training loop puts it into the one all-gather every step
already makes, so every rank sees the same request after the same step and they stop together; no
extra collective, no rank left waiting.
"""
from __future__ import annotations

import signal
from typing import Any, Sequence

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


def signal_number(name: str) -> int:
    """The number of signal `name` (`SIGTERM`, `TERM`, `sigusr1`); ValueError naming it when unknown."""
    text = str(name).strip().upper()
    if not text.startswith("SIG"):
        text = "SIG" + text
    if text in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"checkpoint.on_signal: {name} cannot be caught; use e.g. SIGTERM or SIGUSR1")
    sig = getattr(signal, text, None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"checkpoint.on_signal: unknown signal {name!r}; expected names like SIGTERM, SIGUSR1")
    return int(sig)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class StopSignals:
    """While installed, the signals named record a stop request instead of ending the process.

    `received` is the first such signal's number, 0 before any. `uninstall()` puts the previous
    handlers back.
    """

    def __init__(self, names: Sequence[str]):
        self.received = 0
        self._previous: dict[int, Any] = {}
        for name in names:
            number = signal_number(name)
            if number not in self._previous:
                self._previous[number] = signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, frame: Any) -> None:
        if not self.received:
            self.received = number

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint of `step` at `path` (relative name)."""

    def __init__(self, signum: int, step: int, saved: str):
        self.signum, self.step, self.saved = signum, step, saved
        super().__init__(f"{signal_name(signum)} at step {step}: saved {saved}, exiting")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, the shell's code for 'ended by that signal' (143 for SIGTERM)."""
        return 128 + self.signum
