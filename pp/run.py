"""`torchrun --nproc-per-node N -m pp.run CFG.yaml [--section.key value ...]`: train a model with pp.

The config is read and checked, the model built and split, all before any process-group work; a bad
config ends every rank with exit code 2 and one line on stderr, printed by rank 0 only.
"""
from __future__ import annotations

import os
import socket
import sys
import time

USAGE = """usage: torchrun --nproc-per-node N -m pp.run CFG.yaml [--section.key value ...]
       python -m pp.run CFG.yaml ...   (one process: parallel.pp must be 1)

Trains the model CFG.yaml describes with pipeline parallelism. Any config key can be overridden on the
command line, e.g. --train.steps 100 --schedule.name GPipe. Keys, defaults and meaning:
"""

EXIT_CONFIG = 2      # the config (or a checkpoint it points to) is unusable
EXIT_TRAINING = 3    # training stopped on a checked condition (non-finite loss, ...)


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _fail(code: int, message: str) -> int:
    """Rank 0 prints the one line; the other ranks leave quietly with the same code.

    torchrun stops every worker as soon as one exits, so the other ranks linger a moment: otherwise
    a faster rank's exit can kill rank 0 before its line is printed.
    """
    if _env_rank() == 0:
        print(f"pp.run: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(3.0)
    return code


def _single_process_env() -> None:
    """Outside torchrun, pretend to be rank 0 of 1 so the same code path runs."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m pp.run` and the `pp-run` console script; returns the exit code."""
    from pp.launcher.config import ConfigError, help_text, load_config

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE + help_text())
        return 0 if args else EXIT_CONFIG
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cfg = load_config(args[0], args[1:])
        from pp.launcher.job import prepare

        job = prepare(cfg, world)
    except ConfigError as e:
        return _fail(EXIT_CONFIG, f"bad config: {e}")
    return _train(job)


def _train(job) -> int:
    from pp.comms.backend import destroy, init_process_group_from_env
    from pp.launcher.checkpoint import CheckpointError
    from pp.launcher.train import Trainer, TrainingError

    _single_process_env()
    p = job.cfg.parallel
    device = "cpu" if p.device == "cpu" else None
    rank, world, dev = init_process_group_from_env(device=device, timeout_s=p.timeout_s)
    try:
        if rank == 0:
            _banner(job, world, dev)
        Trainer(job, rank, dev).run()
    except CheckpointError as e:
        return _fail(EXIT_CONFIG, str(e))
    except TrainingError as e:
        return _fail(EXIT_TRAINING, str(e))
    finally:
        destroy()
    return 0


def _banner(job, world: int, device) -> None:
    cfg, layout = job.cfg, job.layout
    data = "this Python's standard library sources" if cfg.train.data == "stdlib" else cfg.train.data
    print(f"pp.run: {cfg.model.name} with {job.n_params / 1e6:.2f}M parameters, {layout.n_stages} stages on "
          f"{world} rank(s) ({device.type}), schedule {layout.schedule} with {cfg.schedule.microbatches} "
          f"microbatches, data: {data}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
