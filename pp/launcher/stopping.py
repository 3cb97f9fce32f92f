"""Stop signals: a worker told to stop (SIGTERM from torchrun, Slurm's USR1) finishes its step and saves.

The handler only records the signal. The training loop puts it into the one all-gather every step
already makes, so every rank sees the same request after the same step and they stop together; no
extra collective, no rank left waiting.

A rank that cannot reach the end of its step (a peer rank failed, or hangs) cannot honour the request;
torchrun and Slurm send SIGTERM exactly then, to the ranks left after one failed, and SIGKILL them
30 s later. So the first signal also starts a watchdog (`arm`): when a peer's failure is posted for the
step under way, or the step has not ended within the grace period, the rank says so in one line and
exits with 128 + the signal's number, without a checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

POLL_S = 0.2  # how often the watchdog looks for a peer's failure and at its deadline

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
    """While installed, the signals named record a stop request instead of ending the process, once
    `arm` was called (training is about to begin); before that, a signal ends the process at once with
    one line and exit code 128 + its number (a rank still setting up has nothing to save).

    `received` is the first such signal's number, 0 before any. `uninstall()` puts the previous
    handlers back.
    """

    def __init__(self, names: Sequence[str]):
        self.received = 0
        self._previous: dict[int, Any] = {}
        self._grace_s: float | None = None
        self._peer_failure: Callable[[], str | None] = lambda: None
        self._where: Callable[[], str] = lambda: "before training"
        self._standing_down = threading.Event()
        self.before_exit: list[Callable[[], Any]] = []   # run before a signal ends the process (a lock's release)
        for name in names:
            number = signal_number(name)
            if number not in self._previous:
                self._previous[number] = signal.signal(number, self._on_signal)

    def arm(self, grace_s: float, peer_failure: Callable[[], str | None], where: Callable[[], str]) -> None:
        """Let a signal end this rank at once when `peer_failure()` returns a line (a peer rank's failure
        in the step under way), or `grace_s` seconds after it arrived when `stand_down()` was not called
        by then. `where()` names the rank and step for the exit line (e.g. "rank 1 at step 3")."""
        self._grace_s, self._peer_failure, self._where = float(grace_s), peer_failure, where

    def stand_down(self) -> None:
        """The loop reached the end of a step and will stop there, or left with an error: no watchdog needed."""
        self._standing_down.set()

    def _on_signal(self, number: int, frame: Any) -> None:
        if not self.received:
            self.received = number
            if self._grace_s is None:
                # Not armed: the rank is still setting up (rendezvous, model build), with no step to save
                # and perhaps a peer that already failed (then it would wait for it forever).
                rank = os.environ.get("RANK")
                who = f"rank {rank}" if rank is not None else "pp.run"
                print(f"pp.run: {who}: {signal_name(number)} arrived before training began: nothing to save; "
                      f"exiting", file=sys.stderr, flush=True)
                self._exit(128 + number)
            threading.Thread(target=self._watch, args=(number, time.monotonic()), name="pp-stop-watchdog",
                             daemon=True).start()

    def _watch(self, number: int, since: float) -> None:
        while not self._standing_down.wait(POLL_S):
            try:
                why = self._peer_failure()
            except Exception:  # noqa: BLE001 - the store may be gone with the failed rank's agent
                why = None
            if why is None and time.monotonic() - since <= self._grace_s:
                continue
            reason = why or (f"its step did not end within parallel.timeout_s={self._grace_s:g}s "
                             f"(a peer rank may hang)")
            print(f"pp.run: {self._where()}: {signal_name(number)} arrived but training cannot stop at a step "
                  f"boundary: {reason}; exiting without a checkpoint", file=sys.stderr, flush=True)
            self._exit(128 + number)

    def _exit(self, code: int) -> None:
        for fn in self.before_exit:
            try:
                fn()
            except Exception:  # noqa: BLE001 - leaving matters more; a stale lock is taken over later
                pass
        sys.stdout.flush()
        os._exit(code)

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
