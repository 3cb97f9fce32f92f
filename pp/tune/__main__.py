"""`torchrun --nproc-per-node N -m pp.tune CFG.yaml [--out PATH] [--section.key value ...]`.

Measures each layer of the config's model on every rank's device, simulates every schedule x
microbatch count x stages per rank with a cost-balanced split, prints the ranking and writes the
fastest configuration within schedule.memory_budget_gib as a config `pp.run` takes
(default: <output.dir>/tuned.yaml).
"""
from __future__ import annotations

import os
import sys

USAGE = __doc__.strip().splitlines()[0].strip("`.") + "\n" + "\n".join(__doc__.strip().splitlines()[1:])
EXIT_CONFIG = 2


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _say(text: str) -> None:
    if _rank() == 0:
        print(text, flush=True)


def _fail(message: str) -> int:
    """Rank 0 prints the one line; the other ranks wait for it before leaving (torchrun stops every rank
    once one exits, and rank 0 could be stopped before its line is out), as `pp.run` does."""
    if _rank() == 0:
        print(message, file=sys.stderr, flush=True)
    else:
        from pp.run import _wait_for_rank_0

        _wait_for_rank_0()
    return EXIT_CONFIG


def _unwritable(path: str) -> str | None:
    """Why the tuned config cannot be written to `path` (checked before measuring), None when it can."""
    if os.path.isdir(path):
        return f"is a directory; expected the path of a file (e.g. {os.path.join(path, 'tuned.yaml')})"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK):
        return f"cannot be written: {parent} is not writable"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m pp.tune`; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: " + USAGE)
        return 0 if args else EXIT_CONFIG
    out_path, iters, rest = None, 3, []
    i = 1
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in ("--out", "--iters"):
            if not eq:
                if i + 1 >= len(args):
                    return _fail(f"pp.tune: {name} needs a value")
                value, i = args[i + 1], i + 1
            if name == "--out":
                out_path = value
            elif not value.isdigit() or int(value) < 1:
                return _fail(f"pp.tune: --iters={value!r}: expected a positive integer")
            else:
                iters = int(value)
        else:
            rest.append(args[i])
        i += 1
    from pp.launcher.config import ConfigError, load_config
    from pp.launcher.validate import validate
    from pp.run import _single_process_env

    from .auto import placeholder

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args[0], rest)
        layout = validate(placeholder(cfg), world)
    except ConfigError as e:
        return _fail(f"pp.tune: bad config: {e}")
    path = out_path or os.path.join(cfg.output.dir, "tuned.yaml")
    why = _unwritable(path)
    if why is not None:
        return _fail(f"pp.tune: {'--out' if out_path else 'output.dir'}: {path} {why}")
    _single_process_env()
    from pp.comms.backend import destroy, init_process_group_from_env

    from .auto import config_yaml, tune

    device = "cpu" if cfg.parallel.device == "cpu" else None
    _, _, dev = init_process_group_from_env(device=device, timeout_s=cfg.parallel.timeout_s)
    try:
        result = tune(cfg, dev, layout.pp, iters=iters)
    except ConfigError as e:
        return _fail(f"pp.tune: bad config: {e}")
    finally:
        destroy()
    from .plan import ranking_table

    _say(f"pp.tune: {cfg.model.name} on {layout.pp} pipeline rank(s) ({dev.type}), {cfg.train.precision}, "
         f"batch {cfg.train.batch_size} x {cfg.model.seq_len} tokens")
    _say(ranking_table(result.plans, result.budget_bytes))
    _say(f"pp.tune: chose {result.why()}")
    if _rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        p = result.chosen
        header = (f"written by pp.tune: {p.schedule}, {p.microbatches} microbatches, {p.stages_per_rank} "
                  f"stage(s) per rank; predicted step {p.step_s * 1e3:.2f} ms, peak {p.peak_gib:.3g} GiB per rank")
        with open(path, "w") as f:
            f.write(config_yaml(result.cfg, header))
        print(f"pp.tune: wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    from pp.comms.backend import exit_process

    exit_process(main())
