"""Stop every rank of a pipeline step promptly when one rank fails in the middle of it.

A rank whose step raises (a bad input found by a stage, an error in the model) posts one line to the
process group's store. Ranks that wait for a transfer check the store while they wait, so they stop
with that line, naming the rank that failed and the action they were waiting in, instead of waiting for
a message that will never come. Nothing is added to a step that goes well: no collective, and the store
is read only once a wait has lasted `POLL_S`.

On CPU (gloo) a wait runs in one helper thread while the caller waits on an event with a timeout, since
a gloo transfer can neither be polled nor waited on with a timeout without breaking the connection. On
GPUs a transfer's wait only orders streams (the host does not block), so waits there are left to the
backend's own timeout.
"""
from __future__ import annotations

import datetime
import pickle
import queue
import threading
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from . import p2p
from .p2p import global_rank

POLL_S = 0.2  # how long a wait runs before the store is first read, and between reads


class PipelineAborted(RuntimeError):
    """Another rank failed during this step; the message names it, its error and where this rank waited."""


class PeerTimeout(TimeoutError):
    """No message from a peer rank within the process group's timeout; the message names the action."""


_steps: dict[str, int] = {}  # group name -> steps begun on it by this process (the same count on every rank)


def _group_name(group: dist.ProcessGroup | None) -> str:
    group = group if group is not None else dist.group.WORLD
    return getattr(group, "group_name", None) or str(dist.get_process_group_ranks(group))


def _group_timeout(group: dist.ProcessGroup | None) -> float | None:
    """The group's own timeout in seconds (init_process_group(timeout=...)), None where it cannot be read."""
    try:
        pg = group if group is not None else dist.group.WORLD
        opts = pg._get_backend(torch.device("cpu")).options
        t = getattr(opts, "_timeout", None)
        return t.total_seconds() if isinstance(t, datetime.timedelta) else None
    except Exception:  # noqa: BLE001 - backends without options: no deadline of our own
        return None


class _WaitThread:
    """One daemon thread that runs blocking `work.wait()` calls handed to it, in order."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="pp-wait", daemon=True).start()

    def _loop(self) -> None:
        while True:
            works, done = self.jobs.get()
            try:
                for work in works:
                    work.wait()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                done.error = e
            done.set()
            works = done = None  # hold no transfer (nor its tensors) between jobs: see backend.exit_process


_thread: _WaitThread | None = None


def raise_named(error: BaseException, what: str) -> None:
    """Raise `error`, or the PipelineAborted naming `what` where its peer's connection went away."""
    lost = peer_lost(error, dist.get_rank(), lambda: what)
    if lost is None:
        raise error
    raise lost from None


def peer_lost(error: BaseException, rank: int, what: Callable[[], str]) -> PipelineAborted | None:
    """The PipelineAborted to raise for a transfer (posted or waited on) that failed because its peer's
    connection went away (gloo's words for it), None for another error."""
    text = str(error).lower()
    if not any(w in text for w in ("connection closed by peer", "connection reset by peer", "broken pipe")):
        return None
    return PipelineAborted(f"a peer rank closed its connection (its process ended or was killed without "
                           f"reporting an error) while rank {rank} waited in {what()}")


class AbortChannel:
    """Per schedule: `begin_step()` at the start of each step (on every rank), `post(error)` from a rank
    that fails, `wait(works, what)` for transfers, which raises PipelineAborted or TimeoutError."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, device: torch.device):
        self.group, self.rank = group, rank
        self.name = _group_name(group)
        self.timeout_s = _group_timeout(group)
        self.blocking = device.type == "cpu"   # gloo: the host blocks in wait(); see the module note
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store (an unusual init): waits still get their deadline
            self.store = None
        self.key = ""

    def begin_step(self) -> None:
        step = _steps[self.name] = _steps.get(self.name, 0) + 1
        self.key = f"pp/abort/{self.name}/{step}"

    def post(self, error: BaseException) -> None:
        """Tell the other ranks that this rank's step failed (once; never raises)."""
        if self.store is None or not self.key or isinstance(error, PipelineAborted):
            return
        first = (str(error).strip().splitlines() or [""])[0]
        try:
            self.store.set(self.key, f"rank {self.rank} failed with {type(error).__name__}: {first}")
        except Exception:  # noqa: BLE001 - the error being raised matters more than this notice
            pass

    def failure(self) -> str | None:
        """The line a rank posted for the step under way, None when no rank has failed in it."""
        if self.store is None or not self.key or not self.store.check([self.key]):
            return None
        return self.store.get(self.key).decode(errors="replace")

    def check(self, what: Callable[[], str]) -> None:
        if self.store is not None and self.key and self.store.check([self.key]):
            line = self.store.get(self.key).decode(errors="replace")
            raise PipelineAborted(f"{line}; rank {self.rank} stopped waiting in {what()}")

    def wait(self, works: Sequence[Any], what: Callable[[], str]) -> None:
        """Wait for `works`; stop when another rank posted a failure or after the group's timeout."""
        if not works:
            return
        if not self.blocking:
            for work in works:
                work.wait()
            return
        global _thread
        if _thread is None:
            _thread = _WaitThread()
        done = threading.Event()
        done.error = None
        _thread.jobs.put((list(works), done))
        start = time.monotonic()
        while not done.wait(POLL_S):
            try:
                self.check(what)
                if self.timeout_s is not None and time.monotonic() - start > self.timeout_s:
                    raise PeerTimeout(f"Timed out after {self.timeout_s:g} s waiting in {what()} for a "
                                      f"message from a peer rank")
            except BaseException:
                _thread = None  # the thread stays blocked in this wait: later waits get a new one
                raise
        if done.error is not None:  # e.g. the connection closed: say why, if the peer left a line
            self.check(what)
            lost = peer_lost(done.error, self.rank, what)
            if lost is not None:
                raise lost from done.error
            raise done.error

    # ------------------------------------------------------------- small objects (tensor metadata)
    def send_object(self, obj: Any, peer: int, what: Callable[[], str], wait: bool = True) -> list | None:
        """`p2p.send_object`, stopped like `wait` on CPU. With `wait=False` (CPU only) the send is left in
        flight and its (works, tensors) returned: the caller waits for them later and keeps them till then."""
        if not self.blocking or p2p.is_strict():  # strict matching posts objects its own way
            p2p.send_object(obj, peer, self.group, what)
            return None
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64)
        dst = global_rank(self.group, peer)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, size, dst, self.group),
                                        dist.P2POp(dist.isend, data, dst, self.group)])
        if not wait:
            return [works, (size, data)]
        self.wait(works, what)
        return None

    def recv_object(self, peer: int, what: Callable[[], str]) -> Any:
        """`p2p.recv_object`, stopped like `wait` on CPU."""
        if not self.blocking or p2p.is_strict():
            return p2p.recv_object(peer, self.group, what)
        src = global_rank(self.group, peer)
        size = torch.zeros(1, dtype=torch.int64)
        self.wait(dist.batch_isend_irecv([dist.P2POp(dist.irecv, size, src, self.group)]), what)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.wait(dist.batch_isend_irecv([dist.P2POp(dist.irecv, data, src, self.group)]), what)
        return pickle.loads(data.numpy().tobytes())
