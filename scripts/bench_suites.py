"""Which configurations one bench.py launch runs: the built-in suites (issue 6's table, the tiny-model
overhead rows) and suites given as JSON files or inline `impl:schedule[:microbatches[:split[:dpN]]]` lists."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from pp.schedules.registry import SCHEDULES, get_spec

BIG_TABLE = [("GPipe", 8), ("1F1B", 8), ("1F1B", 16), ("Interleaved1F1B", 16), ("ZBVZeroBubble", 16),
             ("DualPipeV", 16)]
TINY = dict(layers=8, d_model=512, heads=8, seq=128, tag="overhead")


def builtin_suite(name: str) -> list[dict]:
    """issue6: the table of issue 6, most important first (if time runs out, the tail is what is lost):
    even split both impls, the tiny-model overhead runs, then the cost and measured splits both impls."""
    if name == "issue6":
        def pair(i: int) -> tuple[str, str]:  # alternate who goes first: no impl always runs on a cold GPU
            return ("pp", "torch") if i % 2 == 0 else ("torch", "pp")

        out = [dict(impl=impl, schedule=sched, microbatches=n, split="even")
               for i, (sched, n) in enumerate(BIG_TABLE) for impl in pair(i)]
        out += [dict(impl=impl, schedule=sched, microbatches=16, split="even", **TINY)
                for i, sched in enumerate(("1F1B", "Interleaved1F1B")) for impl in pair(i)]
        out += [dict(impl="pp", schedule=sched, microbatches=16, split="even", cuda_graphs=True, **TINY)
                for sched in ("1F1B", "Interleaved1F1B")]
        for split in ("cost", "measured"):
            out += [dict(impl=impl, schedule=sched, microbatches=n, split=split)
                    for i, (sched, n) in enumerate(BIG_TABLE) for impl in pair(i)]
        return out
    if name == "overhead":  # the tiny model: pp eager, torch, pp with CUDA-graph replay (ZBV: I/W graphs)
        return [dict(impl=impl, schedule=sched, microbatches=16, split="even", cuda_graphs=graphs, **TINY)
                for sched in ("1F1B", "Interleaved1F1B", "ZBVZeroBubble")
                for impl, graphs in (("pp", False), ("torch", False), ("pp", True))]
    if name == "all":  # every schedule both impls, model from the flags
        return [dict(impl=impl, schedule=s, microbatches=None) for s in SCHEDULES for impl in ("pp", "torch")]
    raise KeyError(name)


def parse_suite(text: str) -> list[dict]:
    """A builtin name (issue6, overhead, all), a JSON file (a list of objects of flag overrides, e.g.
    {"impl": "pp", "schedule": "1F1B", "microbatches": 32, "dp": 2}), or an inline list
    `impl:schedule[:microbatches[:split[:dpN]]],...` (microbatches and split may be empty: the flags'
    values; e.g. `pp:1F1B:32::dp2`)."""
    try:
        return builtin_suite(text)
    except KeyError:
        pass
    if os.path.isfile(text):
        data = json.loads(Path(text).read_text())
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise SystemExit(f"--suite {text}: expected a JSON list of objects")
        return data
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        parts = item.split(":")
        if not 2 <= len(parts) <= 5:
            raise SystemExit(f"--suite entry {item!r}: expected impl:schedule[:microbatches[:split[:dpN]]]")
        d = dict(impl=parts[0], schedule=parts[1])
        if len(parts) > 2 and parts[2]:
            d["microbatches"] = int(parts[2])
        if len(parts) > 3 and parts[3]:
            d["split"] = parts[3]
        if len(parts) > 4 and parts[4]:
            dp = parts[4].removeprefix("dp")
            if not dp.isdigit():
                raise SystemExit(f"--suite entry {item!r}: the 5th field is dpN (e.g. dp2), got {parts[4]!r}")
            d["dp"] = int(dp)
        out.append(d)
    return out


def configs_of(args) -> list[argparse.Namespace]:
    if not args.suite:
        return [args]
    out = []
    for over in parse_suite(args.suite):
        cfg = argparse.Namespace(**vars(args))
        for k, v in over.items():
            k = k.replace("-", "_")
            if not hasattr(cfg, k):
                raise SystemExit(f"--suite: unknown setting {k!r}")
            if v is not None:
                setattr(cfg, k, v)
        cfg.schedule = get_spec(cfg.schedule).name
        if cfg.impl not in ("pp", "torch") or cfg.split not in ("even", "cost", "measured"):
            raise SystemExit(f"--suite: bad impl/split in {over}")
        if not isinstance(cfg.dp, int) or isinstance(cfg.dp, bool) or cfg.dp < 1:
            raise SystemExit(f"--suite: dp must be a positive integer in {over}")
        out.append(cfg)
    return out
