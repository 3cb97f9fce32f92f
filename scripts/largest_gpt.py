"""The largest GPT (layer count at a fixed width) that trains at pp = 2 with each setting, from two
`scripts/bench_memory.py` runs at different layer counts (issue 17's table).

    torchrun --nproc-per-node 2 scripts/bench_memory.py --layers 4 --seq 2048 --configs C1,C2,... --out a.jsonl
    torchrun --nproc-per-node 2 scripts/bench_memory.py --layers 8 --seq 2048 --configs C1,C2,... --out b.jsonl
    python scripts/largest_gpt.py a.jsonl b.jsonl --capacity-gib 139 [--check c.jsonl] > table.md

Each rank's peak memory is linear in the layer count (parameters, gradients, optimizer state and the
activations of the layers it holds all grow by the same amount per layer; the embeddings and head are
the constant): the fit through the two runs gives, per configuration, the most layers (a multiple of the
stage count, so the split stays even) whose predicted peak on every rank stays under `--capacity-gib`.
`--check` reads runs made at those predicted sizes and shows their measured peaks beside the prediction.
"""
from __future__ import annotations

import argparse
import json
import sys


def _rows(path: str) -> dict[str, dict]:
    with open(path) as f:
        return {r["config"]: r for r in map(json.loads, filter(str.strip, f)) if r["status"] == "ok"}


def largest(a: dict, b: dict, capacity: float, step: int) -> tuple[int, list[float]]:
    """(most layers, predicted peak GiB per rank there) from runs `a` and `b` at different layer counts."""
    la, lb = a["model"]["layers"], b["model"]["layers"]
    slopes = [(pb - pa) / (lb - la) for pa, pb in zip(a["peak_gib_per_rank"], b["peak_gib_per_rank"])]
    bases = [pa - s * la for pa, s in zip(a["peak_gib_per_rank"], slopes)]
    best = 0
    layers = step
    while all(base + s * layers <= capacity for base, s in zip(bases, slopes)) and layers < 10_000:
        best, layers = layers, layers + step
    return best, [round(base + s * best, 1) for base, s in zip(bases, slopes)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("small")
    p.add_argument("large")
    p.add_argument("--capacity-gib", type=float, default=139.0, help="usable memory per GPU (H200: ~139 GiB)")
    p.add_argument("--check", default=None, help="runs at the predicted sizes (bench_memory.py JSON lines)")
    args = p.parse_args(argv)
    small, large = _rows(args.small), _rows(args.large)
    checks = {}
    if args.check:
        with open(args.check) as f:
            for r in map(json.loads, filter(str.strip, f)):
                checks[(r["config"], r["model"]["layers"])] = r
    print("| setting (impl:schedule:checkpointing:precision) | most layers | predicted peak GiB per rank | "
          "measured there |")
    print("|---|---|---|---|")
    for config in (c for c in small if c in large):
        a, b = small[config], large[config]
        stages = a["pp"] * (2 if a["schedule"] in ("ZBVZeroBubble", "DualPipeV") else 1)
        n, peaks = largest(a, b, args.capacity_gib, stages)
        r = checks.get((config, n))
        seen = "—" if r is None else (", ".join(map(str, r["peak_gib_per_rank"])) if r["status"] == "ok"
                                      else f"failed: {r['error']}")
        name = ":".join(config.split(":")[:4])
        print(f"| {name} | {n} | {', '.join(map(str, peaks))} | {seen} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
