"""Run a function on N CPU ranks (child processes) with a process group ready, for tests.

`run_ranks` reports the first rank that failed (with its traceback), never hangs past its timeout,
and always kills and reaps its children. Only the standard library is imported here.

Children are forked from a fork server that imported torch and pp once and traced a tiny model
(one-thread settings; the trace is skipped on a machine with a CUDA device, which it would initialise), so a call costs a fork instead of a fresh interpreter importing torch (about 2 s
per call on two cores) and a rank's first trace skips torch.export's one-time set-up (about 4 s).
Each child still gets the caller's current environment, working directory, `sys.path`, stdout and
stderr. `PP_TESTING_START_METHOD=spawn` starts fresh interpreters instead, as before.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

__all__ = ["RankError", "run_ranks"]


class RankError(RuntimeError):
    """A rank of `run_ranks` raised; the message starts with the rank and its exception."""

    def __init__(self, rank: int, exc_type: str, message: str, traceback_text: str) -> None:
        self.rank = rank
        self.exc_type = exc_type
        self.exc_message = message
        self.traceback_text = traceback_text
        super().__init__(f"rank {rank} raised {exc_type}: {message}\n\n{traceback_text}")

    def __reduce__(self):
        return (type(self), (self.rank, self.exc_type, self.exc_message, self.traceback_text))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    backend: str = "gloo",
) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` child processes and return the results by rank.

    Each child has the default process group initialised (`backend`, FileStore rendezvous, so no port
    can be taken by a concurrent test) and torchrun's variables set. `fn`, `args` and the return values
    must be picklable. Raises `RankError` for the first rank that raised, `TimeoutError` naming the
    ranks that had not finished after `timeout_s` seconds.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    try:
        payload = pickle.dumps((fn, args))
    except Exception as e:  # noqa: BLE001 - any pickling failure means the same thing to the caller
        raise ValueError(
            f"run_ranks needs a picklable (module-level) function and arguments; {fn!r} with "
            f"{len(args)} argument(s) failed to pickle: {e}"
        ) from e

    ctx = _context(backend)
    store_dir = tempfile.mkdtemp(prefix="pp_run_ranks_")
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "OMP_NUM_THREADS": "1",
    }
    procs: list = []
    conns: list = []
    try:
        for rank in range(world_size):
            recv_end, send_end = ctx.Pipe(duplex=False)
            p = ctx.Process(
                target=_child_main,
                args=(rank, world_size, backend, os.path.join(store_dir, "store"), timeout_s,
                      {**os.environ, **env}, payload, send_end, _Stdio()),
                name=f"pp-rank-{rank}",
                daemon=True,
            )
            p.start()
            send_end.close()  # the parent keeps only the reading end, so EOF means the child is gone
            procs.append(p)
            conns.append(recv_end)
        results = _collect(procs, conns, time.monotonic() + timeout_s, timeout_s, fn)
        _join_all(procs, grace_s=min(10.0, timeout_s))
        return results
    finally:
        _kill_all(procs)
        for c in conns:
            c.close()
        shutil.rmtree(store_dir, ignore_errors=True)


def _collect(procs: list, conns: list, deadline: float, timeout_s: float, fn: Any) -> list:
    """Wait for every rank's report; raise for the earliest failure or on timeout."""
    world_size = len(procs)
    results: dict[int, Any] = {}
    errors: dict[int, tuple] = {}  # rank -> (failure time, RankError)
    pending = set(range(world_size))
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = sorted(pending)
            raise TimeoutError(
                f"run_ranks({_name(fn)}, world_size={world_size}) timed out after {timeout_s:g} s; "
                f"rank(s) {names} had not finished"
            )
        ready = multiprocessing.connection.wait([conns[r] for r in pending], timeout=remaining)
        if not ready:
            continue
        # Drain everything already sent: a secondary failure (peer died) is only ever sent after the
        # primary's report is in its pipe, so the earliest timestamp among these is the first failure.
        for rank in sorted(pending):
            if not conns[rank].poll(0):
                continue
            pending.discard(rank)
            try:
                kind, when, body = conns[rank].recv()
            except (EOFError, OSError):
                # A silent death (signal, os._exit) is the likelier cause of errors read with it.
                errors[rank] = _silent_exit(procs, rank)
                continue
            if kind == "ok":
                results[rank] = pickle.loads(body)
            else:
                errors[rank] = (when, RankError(rank, *body))
        if errors:
            if pending and all(_consequence(e) for _, e in errors.values()):
                # a rank that stopped because another failed may report first: give the one that failed
                # a moment to say why
                grace = min(5.0, max(0.0, deadline - time.monotonic()))
                for c in multiprocessing.connection.wait([conns[r] for r in pending], timeout=grace):
                    rank = conns.index(c)
                    try:
                        kind, when, body = c.recv()
                    except (EOFError, OSError):   # died silently: the likelier cause, as above
                        errors[rank] = _silent_exit(procs, rank)
                        continue
                    if kind != "ok":
                        errors[rank] = (when, RankError(rank, *body))
            causes = [item for item in errors.values() if not _consequence(item[1])] or list(errors.values())
            raise min(causes, key=lambda item: item[0])[1]
    return [results[r] for r in range(world_size)]


def _silent_exit(procs: list, rank: int) -> tuple:
    """(failure time 0: first, RankError) for a rank whose process ended without reporting."""
    procs[rank].join(timeout=1.0)
    return 0.0, RankError(rank, "ProcessExit", f"exited with code {procs[rank].exitcode} without reporting a result",
                          "")


def _consequence(error: RankError) -> bool:
    """Whether a rank's error only reports that another rank failed (pp's step agreement or abort, or
    gloo's word that a peer's connection went away: a rank that died may be seen to end only after the
    others, whose processes hold its pipe too, have exited)."""
    text = error.exc_message.lower()
    return (error.exc_type == "PipelineAborted" or error.exc_message.startswith("pipeline step aborted:")
            or "connection closed by peer" in text or "connection reset by peer" in text)


def _join_all(procs: list, grace_s: float) -> None:
    """Give children that reported a result time to tear their group down and exit."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))


def _kill_all(procs: list) -> None:
    """SIGKILL and reap every child still alive, so nothing outlives the call."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join()
        p.close()


# what the fork server imports once; pp._warm_tracing also traces a tiny model there (torch.export's
# one-time set-up, ~4 s of each forked rank's first trace otherwise)
_PRELOAD = ["torch", "torch.distributed", "pp", "pp._warm_tracing"]
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _context(backend: str) -> Any:
    """The multiprocessing context children start from: a fork server that preloaded torch (started
    on first use, with one-thread settings so that it forks from a single-threaded process), or spawn
    where asked for (`PP_TESTING_START_METHOD=spawn`), for a backend other than gloo (a GPU runtime must
    start in a fresh process) and where there is no fork server (not POSIX)."""
    method = os.environ.get("PP_TESTING_START_METHOD", "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"PP_TESTING_START_METHOD={method!r}: expected forkserver or spawn")
    if method == "spawn" or backend != "gloo" or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    from multiprocessing import forkserver

    server = forkserver._forkserver  # type: ignore[attr-defined]
    if server._forkserver_pid is None:   # not started yet: start it single-threaded
        ctx.set_forkserver_preload(_PRELOAD)
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: "1" for k in _THREAD_VARS})
        try:
            forkserver.ensure_running()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return ctx


class _Stdio:
    """The caller's stdout and stderr (fds 1, 2) as they are when a child starts, handed to it as
    file descriptors: a forked child's own are the fork server's (pytest captures the caller's)."""

    def __reduce__(self) -> tuple:
        from multiprocessing import reduction

        return (_stdio_fds, (reduction.DupFd(1), reduction.DupFd(2)))


def _stdio_fds(out: Any, err: Any) -> tuple[int, int]:
    return out.detach(), err.detach()


def _free_port() -> int:
    """A port free right now, only for code that reads MASTER_PORT; the group uses a FileStore."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _child_main(rank: int, world_size: int, backend: str, store_path: str, timeout_s: float,
                env: dict, payload: bytes, conn: Any, stdio: tuple[int, int]) -> None:
    """Entry point of one child: take the caller's environment and output, set up the group, run the
    function, report, tear down."""
    for fd, target in zip(stdio, (1, 2)):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        dist = _init_group(rank, world_size, backend, store_path, timeout_s)
        fn, args = pickle.loads(payload)
        result = fn(rank, world_size, *args)
        body = pickle.dumps(result)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        when = time.time()
        conn.send(("err", when, (type(e).__qualname__, str(e), traceback.format_exc())))
        conn.close()
        return
    conn.send(("ok", time.time(), body))
    conn.close()
    _teardown(dist)


def _init_group(rank: int, world_size: int, backend: str, store_path: str, timeout_s: float) -> Any:
    """Import torch with one thread and initialise the default group on a FileStore."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(rank % torch.cuda.device_count())
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return dist


def _teardown(dist: Any) -> None:
    """Wait for the peers, then destroy the group (unless `fn` already did)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
