"""The output directory of a run: checked usable before any work, and held by one job at a time.

Rank 0 holds an exclusive OS file lock on `output.dir/.pp.lock` for the whole run; the file names the
holder (host, pid, start time) and carries a heartbeat the holder refreshes, so a lock on a shared
filesystem whose holder died on another host can be told from a live one.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any

LOCK_FILE = ".pp.lock"
HEARTBEAT_S = 30.0          # the holder rewrites its heartbeat this often
STALE_AFTER_S = 4 * HEARTBEAT_S  # a lock from another host whose heartbeat is older is the lock of a dead job


class OutputDirError(RuntimeError):
    """The output directory cannot be used; the message is one line naming the path and the reason."""


def check_usable(path: str, rank: int = 0, create: bool = True) -> None:
    """Create `path` if needed and prove it writable with a small probe file (removed again). With
    `create=False` (every rank but 0, so that rank 0 alone knows whether this job made the directory) a
    missing `path` is only checked to be creatable: its nearest existing ancestor a writable directory.

    Raises OutputDirError naming the path and the reason: a file where a directory must be, no
    permission, a read-only filesystem, a full disk.
    """
    try:
        if not create and not os.path.exists(path):
            parent = os.path.dirname(os.path.abspath(path))
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", parent)
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "permission denied", parent)
            return
        os.makedirs(path, exist_ok=True)
        if not os.path.isdir(path):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
        probe = os.path.join(path, f".pp-probe-{rank}-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise OutputDirError(f"output.dir {path!r} cannot be used: {_reason(path, e)}") from None


def _reason(path: str, e: OSError) -> str:
    if e.errno == errno.ENOTDIR or isinstance(e, NotADirectoryError):
        parent = path
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        blocker = parent if parent and not os.path.isdir(parent) else path
        return f"{blocker!r} is a file, not a directory"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied ({e.filename or path})"
    if e.errno == errno.EROFS:
        return "the filesystem is read-only"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device (or the disk quota is full)"
    return f"{e.strerror or e} ({e.filename or path})"


def _job_key() -> str:
    """What stays the same across torchrun restarts of one job: its run id and rendezvous endpoint."""
    env = os.environ
    return (f"{env.get('TORCHELASTIC_RUN_ID', '')}@{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
            f"/{socket.gethostname()}:{os.getppid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}"


def _restart_of(holder: dict, key: str) -> bool:
    """Whether this process is a torchrun restart of the job that holds the lock (it takes the lock over)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 and holder.get("job") == key


class OutputLock:
    """An exclusive lock on an output directory, held by rank 0 for the whole run.

    `acquire()` raises OutputDirError when another live job holds the directory; it takes over a lock
    left by a dead job (its process gone on this host, or its heartbeat older than STALE_AFTER_S on
    another host), noting it in `note`. A torchrun restart of the same job (same run id, rendezvous
    endpoint and agent process) is the same job and goes on; `steps_redone_before` then carries the
    steps earlier attempts of the job had to redo.
    """

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_FILE)
        self.note = ""
        self.steps_redone_before = 0
        self._fd: int | None = None
        self._info: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    def acquire(self) -> "OutputLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputDirError(f"output.dir {self.out_dir!r} cannot be locked: {_reason(self.path, e)}") from None
            raise OutputDirError(self._busy(self._read())) from None
        old = self._read()
        key = _job_key()
        if old:
            if _restart_of(old, key):
                self.steps_redone_before = int(old.get("steps_redone", 0) or 0)
            elif self._live_elsewhere(old):
                os.close(fd)
                raise OutputDirError(self._busy(old))
            else:
                self.note = (f"output.dir {self.out_dir!r}: took over the lock of a job that is gone "
                             f"({_describe(old)})")
        self._fd = fd
        self._info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                      "heartbeat": time.time(), "job": key, "steps_redone": self.steps_redone_before}
        self._write()
        self._thread = threading.Thread(target=self._beat, name="pp-output-lock", daemon=True)
        self._thread.start()
        return self

    def busy(self) -> str | None:
        """The line `acquire` would raise for a directory another live job holds, else None; takes
        nothing and creates nothing (a second job checks this before its start-up work)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None   # no lock file (or unreadable: acquire says why)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return self._busy(self._read())
            return None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        old = self._read()
        if old and not _restart_of(old, _job_key()) and self._live_elsewhere(old):
            return self._busy(old)
        return None

    def record_steps_redone(self, total: int) -> None:
        """Remember how many steps this job has redone so far (read back by a torchrun restart)."""
        self._info["steps_redone"] = int(total)
        self._write()

    def release(self) -> None:
        """Stop the heartbeat, remove the lock file and drop the OS lock."""
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    # --- internals ------------------------------------------------------------------------------
    def _busy(self, holder: dict) -> str:
        who = _describe(holder) if holder else "host ?, pid ?"
        return (f"output.dir {self.out_dir!r} is in use by another running pp job ({who}); "
                f"give this job its own output.dir or stop that job first")

    @staticmethod
    def _live_elsewhere(old: dict) -> bool:
        """True when the recorded holder still runs although we got the OS lock (a shared filesystem
        whose locks do not reach across hosts): same host and process alive can only be another holder
        if the OS lock did not work; another host counts as alive while its heartbeat is fresh."""
        if old.get("host") == socket.gethostname():
            return False  # the OS lock is authoritative on one host: its holder would still hold it
        beat = old.get("heartbeat")
        return isinstance(beat, (int, float)) and time.time() - beat < STALE_AFTER_S

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write(self) -> None:
        if self._fd is None:
            return
        with self._write_lock:
            data = json.dumps(self._info).encode()
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._info["heartbeat"] = time.time()
            try:
                self._write()
            except OSError:
                pass
