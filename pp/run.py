"""`torchrun --nproc-per-node N -m pp.run CFG.yaml [--section.key value ...]`: train a model with pp.

The config is read and checked, the model built and split, all before any process-group work; a bad
config ends every rank with exit code 2 and one line on stderr, printed by rank 0 only.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
import time
import traceback
from typing import NoReturn

USAGE = """usage: torchrun --nproc-per-node N -m pp.run CFG.yaml [--section.key value ...]
       python -m pp.run CFG.yaml ...   (one process: parallel.pp must be 1)

Trains the model CFG.yaml describes with pipeline parallelism. Any config key can be overridden on the
command line, e.g. --train.steps 100 --schedule.name GPipe. Keys, defaults and meaning:
"""

EXIT_CONFIG = 2      # the config (or a checkpoint it points to) is unusable
EXIT_TRAINING = 3    # training stopped on a checked condition (non-finite loss, ...)
EXIT_RANK_FAILED = 1  # a rank raised (in its forward, say) or lost contact with a peer rank
# A stop signal (checkpoint.on_signal) ends every rank with 128 + the signal's number after the checkpoint
# of the step in flight is saved: 143 for SIGTERM, 138 for SIGUSR1.


def _linger() -> None:
    """Wait a moment before exiting so that another rank's exit reaches torchrun first.

    torchrun stops every worker as soon as one exits and names the first to exit as the root cause:
    a rank that has nothing to report waits, so rank 0's config line gets printed and the rank that
    really failed is the one torchrun names.
    """
    time.sleep(3.0)


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


_ON_FAIL: list = []   # what rank 0 undoes before it reports a failure (an output.dir this run created)


def _undo() -> None:
    """Rank 0, when a run fails: undo what `_ON_FAIL` lists (each at most once)."""
    while _ON_FAIL:
        with contextlib.suppress(OSError):
            _ON_FAIL.pop()()


def _fail(code: int, message: str) -> int:
    """Rank 0 undoes what `_ON_FAIL` lists and prints the one line; the other ranks linger, then leave
    quietly with the same code."""
    if _env_rank() == 0:
        _undo()
        print(f"pp.run: {message}", file=sys.stderr, flush=True)
    else:
        _wait_for_rank_0()
    return code


def _wait_for_rank_0() -> None:
    """A rank other than 0 waits while rank 0 reports a failure; torchrun then stops it with SIGTERM, which
    ends it silently (nothing to save or say here)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    _linger()


def _single_process_env() -> None:
    """Outside torchrun, pretend to be rank 0 of 1 so the same code path runs."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def _first_missing(path: str) -> str | None:
    """The outermost directory of `path` (itself or an ancestor) that does not exist yet, None if it does."""
    path = os.path.abspath(path)
    top = None
    while not os.path.exists(path):
        top, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


def _first_line(e: BaseException) -> str:
    """The exception's first line, joined with the next where it ends in a colon (a heading whose
    substance follows, as transformers' validation errors put it)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or ["(no message)"]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _one_line_warnings() -> None:
    """pp's own warnings (e.g. zero with dp 1) print as one 'pp.run: warning: ...' line, without the
    file:line and source line Python adds; other libraries' warnings keep Python's form."""
    import warnings

    if getattr(warnings.showwarning, "_pp_run", False):
        return
    default, here = warnings.showwarning, os.path.dirname(os.path.abspath(__file__)) + os.sep

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(here):
            print(f"pp.run: warning: {message}", file=sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    show._pp_run = True
    warnings.showwarning = show


def _user_frame(e: BaseException) -> str:
    """' (at file:line in function)' for the line of the user's model that raised (`model_frame`; for a
    SyntaxError, the line it names); '' when there is none."""
    from pp.stage.traced import model_frame

    if isinstance(e, SyntaxError) and e.filename and e.lineno:
        return f" (at {e.filename}:{e.lineno})"
    f = model_frame(e)
    return f" (at {f.filename}:{f.lineno} in {f.name})" if f is not None else ""


def _remove_empty(path: str, top: str) -> None:
    """Remove `path` and its parents up to `top` (the directories this run created) while they are empty."""
    path = os.path.abspath(path)
    while True:
        os.rmdir(path)   # OSError (not empty) ends it, left to the caller
        if path == top or os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m pp.run` and the `pp-run` console script; returns the exit code."""
    from pp.launcher.config import ConfigError, help_text, load_config

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE + help_text())
        return 0 if args else EXIT_CONFIG
    _one_line_warnings()
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = load_config(args[0], args[1:])
    except ConfigError as e:
        return _fail(EXIT_CONFIG, f"bad config: {e}")
    from pp.launcher.outdir import OutputDirError, OutputLock, check_usable
    from pp.launcher.stopping import StopSignals

    lock = None
    if _env_rank() == 0:  # a directory another job holds: say so at once, before tracing the model
        busy = OutputLock(cfg.output.dir).busy()
        if busy is not None:
            return _fail(EXIT_CONFIG, busy)
    try:
        from pp.launcher.job import Job, prepare
        from pp.launcher.validate import validate
        from pp.tune.auto import is_auto, placeholder

        auto = cfg if is_auto(cfg) else None  # schedule.name auto: chosen after the process group is up
        if auto is not None:  # every key checked now; the model is built and cut once the choice is made
            job = Job(placeholder(cfg), validate(placeholder(cfg), world), None, 0)
        else:
            job = prepare(cfg, world)   # checks every key, checkpoint.on_signal included
            if cfg.schedule.memory_budget_gib is not None and _env_rank() == 0:
                print(f"pp.run: schedule.memory_budget_gib={cfg.schedule.memory_budget_gib:g} is used only by "
                      f"schedule.name auto (and pp.tune); {job.layout.schedule} runs without it", flush=True)
        stop = StopSignals(cfg.checkpoint.on_signal)  # from here on a stop signal is recorded, not fatal
        created = _first_missing(cfg.output.dir)   # read by rank 0 only: it alone creates the directories
        check_usable(cfg.output.dir, _env_rank(), create=_env_rank() == 0)
        if _env_rank() == 0:  # before any process-group work: a second job must touch nothing
            lock = OutputLock(cfg.output.dir).acquire()
            stop.before_exit.append(lock.release)
            if lock.note:
                print(f"pp.run: {lock.note}", flush=True)
            if created:   # a run that fails before writing anything leaves no empty output.dir behind
                _ON_FAIL.append(lambda: (lock.release(), _remove_empty(cfg.output.dir, created)))
    except ConfigError as e:
        return _fail(EXIT_CONFIG, f"bad config: {e}")
    except OutputDirError as e:
        return _fail(EXIT_CONFIG, str(e))
    except Exception as e:  # noqa: BLE001 - the model's own code raised while it was built or traced
        return _fail(EXIT_CONFIG, f"cannot build model.name={cfg.model.name!r}: {type(e).__name__}: "
                                  f"{_first_line(e)}{_user_frame(e)}")
    try:
        return _train(job, stop, lock, auto)
    finally:
        if lock is not None:
            lock.release()


def _train(job, stop, lock, auto=None) -> int:
    from pp.comms.backend import destroy, init_process_group_from_env
    from pp.launcher.config import ConfigError
    from pp.launcher.checkpoint import CheckpointError
    from pp.data import DataError
    from pp.launcher.stopping import Stopped
    from pp.launcher.train import Trainer, TrainingError
    from pp.weights import WeightsError

    _single_process_env()
    p = job.cfg.parallel
    device = "cpu" if p.device == "cpu" else None
    rank, world, dev = init_process_group_from_env(device=device, timeout_s=p.timeout_s)
    trainer = None
    try:
        if auto is not None:
            job = _auto_job(auto, job.layout.pp, world, dev, rank)
        if rank == 0:
            _banner(job, world, dev)
        trainer = Trainer(job, rank, dev, stop=stop, lock=lock)
        trainer.run()
    except Stopped as e:  # every rank stopped after the same step; the checkpoint of it is on disk
        if rank == 0:
            print(f"pp.run: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except (CheckpointError, WeightsError) as e:
        return _fail(EXIT_CONFIG, str(e))
    except ConfigError as e:  # schedule.name auto: nothing fits the memory budget, say
        return _fail(EXIT_CONFIG, f"bad config: {e}")
    except DataError as e:  # found by the ranks that read data (first and last stages read the same windows)
        if rank == 0:       # rank 0 holds the first stage, so it always finds it too: one line, from it
            _undo()
            print(f"pp.run: bad data: {e}", file=sys.stderr, flush=True)
            if lock is not None:
                lock.release()
        else:
            _wait_for_rank_0()
        os._exit(EXIT_CONFIG)
    except TrainingError as e:
        return _fail(EXIT_TRAINING, str(e))
    except Exception as e:  # noqa: BLE001 - any other failure ends this rank with one line saying why
        if rank == 0:
            _undo()   # an output.dir this run created and left empty (rmdir: only while it is empty)
        if lock is not None:
            lock.release()
        _rank_failed(rank, getattr(trainer, "current_step", 0), e, p.timeout_s)
    finally:
        destroy()
    return 0


def _auto_job(cfg, n_ranks: int, world: int, device, rank: int):
    """schedule.name auto: measure and choose on every rank alike (pp.tune), log the choice, and
    prepare the job that runs it."""
    from pp.launcher.job import prepare
    from pp.tune.auto import tune

    result = tune(cfg, device, n_ranks)
    if rank == 0:
        print(f"pp.run: schedule auto chose {result.why()}", flush=True)
    job = prepare(result.cfg, world)
    p = result.chosen
    job.tuned = {"schedule": p.schedule, "microbatches": p.microbatches, "stages_per_rank": p.stages_per_rank,
                 "split_points": list(p.points), "predicted_step_s": p.step_s, "predicted_bubble": p.bubble,
                 "predicted_peak_gib": p.peak_gib, "memory_budget_gib": result.budget_bytes / 2**30}
    return job


def _rank_failed(rank: int, step: int, e: Exception, timeout_s: float) -> NoReturn:
    """Print one line naming this rank and its error, then leave at once (exit code 1).

    A rank whose own code raised prints the traceback above that line. A rank that only lost contact
    with a peer says so without one: the peer's own line says why. Leaving by os._exit skips the
    process-group teardown, which would wait again for the transfers a dead or stuck peer never completes.
    """
    from torch.distributed import DistError

    at = f" at step {step}" if step else ""
    notes = "".join(f" ({note.removeprefix('pp: ')})" for note in getattr(e, "__notes__", ()))
    text = re.sub(r"^\[[^\]]*\]\s*", "", _first_line(e)) or "(no message)"  # drop gloo's [file:line]
    from pp.comms.abort import PeerTimeout, PipelineAborted

    aborted = isinstance(e, PipelineAborted)  # another rank failed and said so (pp.comms.abort)
    lost_peer = isinstance(e, (DistError, PipelineAborted, PeerTimeout)) or "/gloo/" in str(e)  # gloo's errors name its sources
    timed_out = isinstance(e, PeerTimeout) or (
        lost_peer and not aborted and re.search(r"timed out|timeout", text, re.IGNORECASE) is not None)
    if aborted:
        line = f"rank {rank} stopped{at}: {text}"
    elif not lost_peer:
        traceback.print_exc()
        line = f"rank {rank} failed{at}: {type(e).__name__}: {text}{notes}"
    elif timed_out:
        line = (f"rank {rank} stopped{at}: no message from a peer rank within parallel.timeout_s={timeout_s:g}s "
                f"(a rank hangs, was stopped, or is far slower): {text}{notes}")
    else:
        line = (f"rank {rank} stopped{at}: it lost the connection to a peer rank, which has probably failed "
                f"(see that rank's message): {text.split('. ')[0]}{notes}")
    sys.stdout.flush()
    print(f"pp.run: {line}", file=sys.stderr, flush=True)
    if lost_peer and not timed_out:
        _linger()
    os._exit(EXIT_RANK_FAILED)


def _banner(job, world: int, device) -> None:
    from pp.launcher.metrics import count

    cfg, layout = job.cfg, job.layout
    data = "this Python's standard library sources" if cfg.train.data == "stdlib" else cfg.train.data
    p = cfg.parallel
    mesh = f", pp={layout.pp} x dp={p.dp} x tp={p.tp}" if p.dp > 1 or p.tp > 1 else ""
    print(f"pp.run: {cfg.model.name} with {job.n_params / 1e6:.2f}M parameters, {count(layout.n_stages, 'stage')} "
          f"on {count(world, 'rank')} ({device.type}{mesh}), schedule {layout.schedule} with "
          f"{count(cfg.schedule.microbatches, 'microbatch')}, data: {data}", flush=True)


def _interrupted() -> int:
    """Ctrl-C (SIGINT, which torchrun passes on to every rank) when it is not in checkpoint.on_signal:
    one line from rank 0, no traceback, exit code 130; the newest checkpoint stays the resume point."""
    if _env_rank() == 0:
        print("pp.run: interrupted (SIGINT): exiting without saving the step in flight; the newest checkpoint "
              "is where checkpoint.resume starts (add SIGINT to checkpoint.on_signal to save on Ctrl-C)",
              file=sys.stderr, flush=True)
    return 128 + 2


if __name__ == "__main__":
    from pp.comms.backend import exit_process

    try:
        code = main()
    except KeyboardInterrupt:
        code = _interrupted()
    exit_process(code)
