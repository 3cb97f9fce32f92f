"""Process-group setup: which backend serves which device, and the default group from torchrun's env.

Everything else in pp asks this module for the rank, world size and device instead of reading the
environment itself, so a group made by torchrun and one made by `pp.testing.run_ranks` look the same.
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

from typing import Any, NoReturn

import torch
import torch.distributed as dist

__all__ = [
    "TORCHRUN_VARS",
    "backend_for_device",
    "default_device",
    "destroy",
    "get_rank",
    "get_world_size",
    "init_process_group_from_env",
    "is_initialized",
]

_BACKEND_BY_DEVICE_TYPE = {"cuda": "nccl", "cpu": "gloo", "xpu": "xccl", "hpu": "hccl"}
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

_device: torch.device | None = None  # the device chosen by the init that made the current group


def backend_for_device(device: torch.device | str) -> str:
    """The torch.distributed backend for a device type: cuda→nccl, cpu→gloo, xpu→xccl, hpu→hccl."""
    device_type = torch.device(device).type
    try:
        return _BACKEND_BY_DEVICE_TYPE[device_type]
    except KeyError:
        known = ", ".join(sorted(_BACKEND_BY_DEVICE_TYPE))
        raise ValueError(
            f"no distributed backend known for device type {device_type!r} (from {device!r}); "
            f"expected one of {known}"
        ) from None


def default_device() -> torch.device:
    """The device a rank's stages go to when none is named: the one `init_process_group_from_env` chose;
    cpu for a process group made elsewhere without a CUDA backend (gloo alone: its ranks move CPU
    tensors); else cuda:LOCAL_RANK (LOCAL_RANK defaults to 0) when CUDA is available, else cpu.
    ValueError, naming the count, for a LOCAL_RANK this machine has no CUDA device for (more
    processes per machine than GPUs)."""
    if is_initialized():
        if _device is not None:
            return _device
        if "nccl" not in str(dist.get_backend()):
            return torch.device("cpu")
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank, n = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    if local_rank >= n:
        raise ValueError(f"LOCAL_RANK={local_rank} would use cuda:{local_rank}, but this machine shows {n} CUDA "
                         f"device(s): start at most {n} process(es) per machine (torchrun --nproc-per-node), "
                         f"or name the device")
    return torch.device("cuda", local_rank)


def init_process_group_from_env(
    device: torch.device | str | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
) -> tuple[int, int, torch.device]:
    """Initialise the default group from torchrun's environment and return (rank, world_size, device).

    The device is `device`, else cuda:LOCAL_RANK when CUDA is available, else cpu; a CUDA device is
    made current. The backend is `backend`, else "cpu:gloo,cuda:nccl" for CUDA (so small CPU tensors
    such as status flags can use the same group without a device sync), else the device's backend.
    With `timeout_s` on a GPU, a pipeline transfer still pending after 0.9 x `timeout_s` ends the
    process with one line naming the action it waits in (`p2p.watch_transfers`).
    Idempotent: if a group already exists, returns its rank, world size and device.
    """
    global _device
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if dist.is_initialized():
        if device is not None:
            return dist.get_rank(), dist.get_world_size(), torch.device(device)
        return dist.get_rank(), dist.get_world_size(), _device or _device_of_current_group()

    rank, world_size, local_rank = _read_torchrun_env()
    dev = torch.device(device) if device is not None else _device_for_local_rank(local_rank)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else backend_for_device(dev)
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, **kwargs)
    else:
        # torchrun shares its store with the workers and keeps it across restarts, so a restarted group
        # would read the failed attempt's keys (gloo's peer addresses, NCCL's unique id) and fail to
        # connect (pytorch/pytorch#135712). A prefix per attempt keeps the attempts apart.
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, **kwargs))
        store = dist.PrefixStore(f"pp/attempt-{attempt}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **kwargs)
    _device = dev
    if timeout_s is not None and dev.type != "cpu":
        from .p2p import watch_transfers

        watch_transfers(0.9 * timeout_s, dev.type)   # before NCCL's watchdog, which does not name the action
    return rank, world_size, dev


def is_initialized() -> bool:
    """Whether the default process group exists (False also when torch.distributed is unavailable)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default group; 0 when there is no group (single process)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """The default group's size; 1 when there is no group (single process)."""
    return dist.get_world_size() if is_initialized() else 1


def init_mesh(device_type: str, shape: tuple[int, ...], names: tuple[str, ...]) -> Any:
    """A DeviceMesh over the default group (collective: every rank calls it with the same arguments)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, shape, mesh_dim_names=names)


def default_backend() -> str:
    """The default group's backend string, e.g. 'cpu:gloo,cuda:nccl'; '' when there is no group."""
    return str(dist.get_backend()) if is_initialized() else ""


def barrier() -> None:
    """Wait for every rank of the default group; a no-op in a single process."""
    if is_initialized():
        dist.barrier()


def all_gather_object(obj: Any) -> list:
    """Every rank's picklable `obj`, by rank (`[obj]` in a single process). Control data only."""
    if not is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    """Destroy the default group if there is one; safe to call twice."""
    global _device
    if is_initialized():
        dist.destroy_process_group()
    _device = None


def _read_torchrun_env() -> tuple[int, int, int]:
    """RANK, WORLD_SIZE, LOCAL_RANK as ints, after checking that every torchrun variable is set."""
    missing = [name for name in TORCHRUN_VARS if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"environment variable(s) {', '.join(missing)} not set; launch with torchrun "
            f"(e.g. `torchrun --nproc-per-node 2 -m pp.run cfg.yaml`), which sets {', '.join(TORCHRUN_VARS)}"
        )
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        try:
            values[name] = int(os.environ[name])
        except ValueError:
            raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None
    rank, world_size, local_rank = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size}: expected 0 <= RANK < WORLD_SIZE")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK={local_rank}: expected a non-negative integer")
    return rank, world_size, local_rank


def _device_for_local_rank(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _device_of_current_group() -> torch.device:
    """Best guess for a group this module did not make: the current CUDA device if it uses NCCL."""
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_at_exit: dict[str, Any] = {"registered": False, "pending": False, "code": None}


def close_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, if it is a gloo one still up and
    no pipeline step left transfers pending (a failed step: see `transfers_may_be_pending`). Left to the
    interpreter's finalization, a gloo worker thread may free a transfer's tensor after the shutdown
    began and abort the process ("terminate called without an active exception", exit code -6) even
    after a clean one-line error; destroying the group first joins those threads. It happens in the
    `atexit` handler `import pp` registers, so after the handlers registered since."""
    _at_exit["registered"] = True


def transfers_may_be_pending() -> None:
    """A step failed mid-way: its transfers may never complete, so the group is left alone at exit
    (destroying it could wait on them forever) and the process ends without the finalization that
    would abort it (a waiting thread wakes when its peer's connection closes and cannot take the GIL):
    an exception nobody catches ends it with exit code 1 once its traceback is printed; a script that
    caught the error and ends, or calls `sys.exit(code)`, ends with its code once the `atexit` handlers
    registered since `import pp` have run."""
    if _at_exit["pending"]:
        return
    _at_exit["pending"] = True
    previous, real_exit = sys.excepthook, sys.exit

    def hook(kind, value, tb) -> None:
        previous(kind, value, tb)
        exit_process(1)

    def exit(code: Any = None) -> NoReturn:
        _at_exit["code"] = code
        real_exit(code)

    sys.excepthook, sys.exit = hook, exit


def at_interpreter_exit() -> None:
    """pp's `atexit` work (registered by `import pp`): see `close_at_exit`, `transfers_may_be_pending`."""
    if _at_exit["pending"]:
        code = _at_exit["code"]
        if code is not None and not isinstance(code, int):   # as Python treats sys.exit("message")
            print(code, file=sys.stderr)
            code = 1
        logging.shutdown()
        exit_process(code or 0)
    if _at_exit["registered"]:
        _close_default_group()


def _close_default_group() -> None:
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() != "gloo":
            return
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - exiting anyway
        pass


def exit_process(code: int) -> NoReturn:
    """Leave with `code` once output is flushed, skipping the interpreter's finalization (the last call
    of a command run under torchrun: pp.run, pp.tune).

    Everything the command owns must be closed by then (process group destroyed, lock released, files written).
    Finalization can still abort a finished rank (SIGABRT, "terminate called without an active
    exception"): a gloo worker thread that frees a transfer's tensor after the interpreter began to shut
    down cannot take the GIL. A run that succeeded must not end with exit code -6.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
