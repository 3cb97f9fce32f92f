"""Point-to-point transfers between pipeline ranks: batched tensor sends/receives and small objects.

Ranks here are ranks *within* the pipeline group; conversion to global ranks happens in one place.
"""
from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import warnings
from collections import deque
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

# Test aid (see `strict_matching`); PP_P2P_STRICT=1 turns it on in processes a test starts.
_STRICT = os.environ.get("PP_P2P_STRICT") == "1"


def is_strict() -> bool:
    """Whether `strict_matching` is on (gloo matching transfers as NCCL does)."""
    return _STRICT


def strict_matching(enabled: bool = True) -> None:
    """Make transfers over gloo match the way NCCL's do, so that a CPU test catches what hangs on GPUs.

    gloo matches every send with its receive on its own and buffers what arrives early. NCCL runs a
    rank's transfers on one stream in the order they were posted, a group as a whole, and inside a
    group pairs the i-th send to a peer with the i-th receive from it: a group whose transfers the
    peer posts in two groups with work between them can wait forever. In strict mode every `post`
    (and every small-object transfer) is one group that must meet exactly one group of each peer it
    names, with the same transfers in the same order: it blocks until every such peer posts its
    group, and raises RuntimeError naming both groups where they differ (NCCL would hang or mix
    tensors up there). Test-only: it costs a header exchange per group.
    """
    global _STRICT
    _STRICT = bool(enabled)


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    if group is None or group is dist.GroupMember.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group)


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def post(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]],
         group: dist.ProcessGroup | None, label: Any = "") -> list:
    """Start all sends and receives of one group together; returns their work handles.

    One call goes to the backend as one group (NCCL group call). `label` (a string, or a callable
    giving one) names what the group is for in the line of the transfer watchdog (`watch_transfers`).
    NCCL runs groups in the order they
    are posted and pairs transfers group by group, so the caller must post with each peer exactly the
    group that peer posts with it, in the same order (see `strict_matching`, which checks that on gloo).
    """
    if _STRICT:
        return _post_strict(sends, recvs, group)
    ops = [dist.P2POp(dist.isend, t, global_rank(group, peer), group) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, global_rank(group, peer), group) for t, peer in recvs]
    if not ops:
        return []
    works = dist.batch_isend_irecv(ops)
    dog = _watchdog_for(ops[0].tensor.device)
    if dog is not None:
        dog.add(label, works)
    return works


class _Watchdog:
    """Ends the process with one line naming what it waits in when a posted group has not completed
    within `timeout_s`. On GPUs a rank waiting for a peer does not block in Python: its device waits,
    and its host later stops anywhere (a full launch queue, a sync); only the posted groups tell what
    it is waiting in. NCCL's own watchdog would end it after the same time without saying that."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.pending: deque = deque()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="pp-p2p-watchdog", daemon=True)
        self.thread.start()

    def add(self, label: Any, works: list) -> None:
        with self.lock:
            while self.pending and all(w.is_completed() for w in self.pending[0][2]):
                self.pending.popleft()   # so that finished transfers' tensors are not kept alive
            self.pending.append((time.monotonic(), label, works))

    def _oldest_stuck(self) -> tuple[float, str] | None:
        """(posted time, label) of the oldest group still incomplete; drops the completed ones."""
        with self.lock:
            items = list(self.pending)
        done = [item for item in items if all(w.is_completed() for w in item[2])]
        with self.lock:
            for item in done:
                self.pending.remove(item)
            if not self.pending:
                return None
            posted, label, _ = self.pending[0]
        return posted, label() if callable(label) else str(label)

    def _loop(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 20))
            oldest = self._oldest_stuck()
            if oldest is not None and time.monotonic() - oldest[0] > self.timeout_s:
                rank = dist.get_rank() if dist.is_initialized() else 0
                print(f"pp: rank {rank} stopped: no message from a peer rank within timeout_s={self.timeout_s:g}s "
                      f"(a rank hangs, was stopped, or is far slower): the transfers posted for "
                      f"{oldest[1] or 'a pipeline step'} never completed", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(1)


_watchdogs: dict[str, _Watchdog] = {}
_watch_timeout: dict[str, float] = {}


def watch_transfers(timeout_s: float, device_type: str = "cuda") -> None:
    """End this process with a line naming the waiting action when a group posted on `device_type`
    has not completed within `timeout_s` seconds (checked every min(1, timeout_s/20) s).

    `init_process_group_from_env` turns it on for CUDA at 0.9 x its `timeout_s`, so that it speaks
    before NCCL's own watchdog ends the process at `timeout_s` without naming the action (there a
    waiting rank's host does not block where it waits). On gloo the waiting call itself raises after
    the group's timeout, with a note naming the action. ValueError if `timeout_s` is not positive.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    _watch_timeout[device_type] = float(timeout_s)
    dog = _watchdogs.get(device_type)
    if dog is not None:
        dog.timeout_s = float(timeout_s)


def _watchdog_for(device: torch.device) -> _Watchdog | None:
    timeout_s = _watch_timeout.get(device.type)
    if timeout_s is None:
        return None
    dog = _watchdogs.get(device.type)
    if dog is None:
        dog = _watchdogs[device.type] = _Watchdog(timeout_s)
    return dog


def _sizes(ops: Sequence[tuple[torch.Tensor, int]], peer: int) -> list[int]:
    return [t.numel() * t.element_size() for t, p in ops if p == peer]


def _post_strict(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]],
                 group: dist.ProcessGroup | None) -> list:
    """One NCCL-like group over gloo: exchange with each peer what this group moves to and from it
    (byte counts in order), check that the peer's group is its mirror image, then move the data."""
    me = dist.get_rank(group)
    peers = sorted({p for _, p in sends} | {p for _, p in recvs})
    works = []
    for p in peers:
        header = torch.tensor([len(_sizes(sends, p))] + _sizes(sends, p) + _sizes(recvs, p), dtype=torch.int64)
        works.append(dist.isend(torch.tensor([header.numel()]), global_rank(group, p), group))
        works.append(dist.isend(header, global_rank(group, p), group))
    for p in peers:
        n = torch.zeros(1, dtype=torch.int64)
        dist.recv(n, global_rank(group, p), group)
        theirs = torch.zeros(int(n), dtype=torch.int64)
        dist.recv(theirs, global_rank(group, p), group)
        k = int(theirs[0])
        their_sends, their_recvs = theirs[1:1 + k].tolist(), theirs[1 + k:].tolist()
        if their_sends != _sizes(recvs, p) or their_recvs != _sizes(sends, p):
            raise RuntimeError(
                f"pp strict p2p: rank {me} posted a group that sends {_sizes(sends, p)} bytes to rank {p} and "
                f"receives {_sizes(recvs, p)} from it, but rank {p}'s group at that point sends {their_sends} "
                f"and receives {their_recvs}: NCCL, which pairs transfers group by group, would hang or mix "
                f"tensors up here")
    works += [dist.isend(t, global_rank(group, p), group) for t, p in sends]
    works += [dist.irecv(t, global_rank(group, p), group) for t, p in recvs]
    for w in works:
        w.wait()
    return []


def _object_device(group: dist.ProcessGroup | None) -> torch.device:
    backend = dist.get_backend(group)
    if "gloo" in backend:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Blocking:
    """Stands for a blocking call in the watchdog's list: completed once the call has returned."""

    __slots__ = ("done",)

    def __init__(self):
        self.done = False

    def is_completed(self) -> bool:
        return self.done


def _watched(fn, label: Any, group: dist.ProcessGroup | None):
    """Run the blocking transfer `fn()` under the watchdog of the group's object device, if any."""
    dog = _watchdog_for(_object_device(group))
    if dog is None:
        return fn()
    mark = _Blocking()
    dog.add(label, [mark])
    try:
        return fn()
    finally:
        mark.done = True


def send_object(obj: Any, peer: int, group: dist.ProcessGroup | None, label: Any = "") -> None:
    """Blocking send of a small picklable object (tensor metadata); not for the hot path. `label`
    names what it is for, as in `post`."""
    return _watched(lambda: _send_object(obj, peer, group), label, group)


def _send_object(obj: Any, peer: int, group: dist.ProcessGroup | None) -> None:
    if _STRICT:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        _post_strict([(torch.tensor([data.numel()]), peer)], [], group)
        _post_strict([(data, peer)], [], group)
        return
    dist.send_object_list([obj], dst=global_rank(group, peer), group=group, device=_object_device(group))


def recv_object(peer: int, group: dist.ProcessGroup | None, label: Any = "") -> Any:
    """Blocking receive of what `send_object` sent from `peer`; `label` as in `post`."""
    return _watched(lambda: _recv_object(peer, group), label, group)


def _recv_object(peer: int, group: dist.ProcessGroup | None) -> Any:
    if _STRICT:
        n = torch.zeros(1, dtype=torch.int64)
        _post_strict([], [(n, peer)], group)
        data = torch.zeros(int(n), dtype=torch.uint8)
        _post_strict([], [(data, peer)], group)
        return pickle.loads(data.numpy().tobytes())
    box = [None]
    dist.recv_object_list(box, src=global_rank(group, peer), group=group, device=_object_device(group))
    return box[0]


def max_all_reduce(values: Sequence[int], group: dist.ProcessGroup | None,
                   what: str = "an agreement all-reduce", notice_after_s: float | None = None) -> list[int]:
    """Element-wise max of a few integers over the group, on the CPU when the group can (no device sync).
    A peer whose process ended (its connection closed) raises PipelineAborted naming `what` was waited in.
    On gloo, `notice_after_s` seconds without the other ranks warns once per wait, naming `what`."""
    device = _object_device(group)
    t = torch.tensor(list(values), dtype=torch.int64, device=device)
    try:
        if notice_after_s is None or device.type != "cpu":
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        else:   # gloo: wait a while, then say what is being waited for, and wait on
            work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group, async_op=True)
            try:
                work.wait(timeout=timedelta(seconds=notice_after_s))
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                warnings.warn(f"rank {dist.get_rank()} has waited {notice_after_s:g} s in {what} for the other "
                              f"ranks of its group: every rank calls step() (or eval()) for each step, and a "
                              f"rank that calls it alone waits here until they do", stacklevel=3)
                work.wait()
    except Exception as e:  # noqa: BLE001 - gloo's raw line for a peer gone becomes pp's
        from .abort import raise_named
        raise_named(e, what)
    return t.tolist()


def sum_all_reduce_(t: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """In-place sum of `t` over the group (gradients of parameters shared by stages on several ranks)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def warm_up(group: dist.ProcessGroup | None, device: torch.device) -> None:
    """One collective on the device before any batched P2P: NCCL needs every rank of the group in its
    first call, and a P2P batch between two ranks would otherwise be that first call."""
    if device.type != "cpu" and dist.get_world_size(group) > 1:
        pg = group if group is not None else dist.group.WORLD
        key = (id(pg), str(device))
        if _WARMED.get(key) is pg:   # once per group and device: a schedule built again (lists reloaded) skips it
            return
        dist.all_reduce(torch.zeros(1, device=device), group=group)
        _WARMED[key] = pg   # held, so that its id is not taken by a later group


_WARMED: dict[tuple[int, str], object] = {}
