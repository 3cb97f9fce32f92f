"""Peak host memory per rank while building a pp = 4 pipeline of a GPT of >= 1 GB of fp32 parameters on
the CPU: the whole model built on every rank (pp before issue 17) against the meta-device build, where
each rank allocates and initialises only its own stages.

    python scripts/bench_meta_init.py --out bench/results/20261130-cpu-meta-init

Each mode runs in 4 fresh gloo ranks (pp.testing.run_ranks). A rank first traces a tiny model (so that
torch.export's own imports do not count), then resets its peak resident set (/proc/self/clear_refs)
and builds: `whole` = the GPT built and initialised on the CPU, then `pp.parallelize` (which traces it);
`meta` = the GPT built on the meta device, then `pp.parallelize(..., init_fn=...)`. Reported per rank:
the growth of the peak resident set over the build, and the bytes of the parameters the rank keeps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _build(rank: int, world: int, mode: str, model: dict) -> dict:
    import pp
    from pp.launcher.config import ModelConfig
    from pp.launcher.models import GPT, build_model, init_fn
    from pp.launcher.train import lm_loss

    warnings.simplefilter("ignore")
    with torch.device("meta"):
        tiny = GPT(vocab_size=8, d_model=8, n_layers=2, n_heads=2, seq_len=4)
    pp.pipeline(tiny, (torch.zeros(1, 4, dtype=torch.long, device="meta"),), split_policy=pp.split_by_cost(2))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, t0 = _status("VmRSS"), time.perf_counter()
    cfg = ModelConfig(name="gpt", **model)
    mb = (torch.zeros(1, model["seq_len"], dtype=torch.long),)
    if mode == "whole":
        gpt = build_model(cfg, seed=0)
        total = sum(p.numel() * 4 for p in gpt.parameters())
        par = pp.parallelize(gpt, mb, n_microbatches=4, loss_fn=lm_loss)
    else:
        gpt = build_model(cfg, seed=0, device="meta")
        total = sum(p.numel() * 4 for p in gpt.parameters())
        par = pp.parallelize(gpt, mb, n_microbatches=4, loss_fn=lm_loss, init_fn=init_fn(cfg, 0))
    return {"rank": rank, "peak_growth_bytes": _status("VmHWM") - before, "model_bytes": total,
            "own_param_bytes": sum(p.numel() * 4 for p in par.parameters()), "build_s": time.perf_counter() - t0}


def main(argv=None) -> int:
    from pp.testing import run_ranks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=21)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--out", default=None, help="directory for meta_init.json and meta_init.md")
    args = p.parse_args(argv)
    model = dict(vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=8, seq_len=64)
    results = {mode: run_ranks(_build, args.ranks, mode, model, timeout_s=1800) for mode in ("whole", "meta")}
    gib = 2**30
    lines = [f"GPT d_model {args.d_model}, {args.layers} layers: "
             f"{results['meta'][0]['model_bytes'] / gib:.2f} GiB of fp32 parameters, pp = {args.ranks} on the CPU",
             "", "| rank | stage params (GiB) | peak RSS growth, whole model on every rank (GiB) | "
                 "peak RSS growth, meta build (GiB) |", "| --- | --- | --- | --- |"]
    for w, m in zip(results["whole"], results["meta"]):
        lines.append(f"| {w['rank']} | {m['own_param_bytes'] / gib:.2f} | {w['peak_growth_bytes'] / gib:.2f} | "
                     f"{m['peak_growth_bytes'] / gib:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "meta_init.json"), "w") as f:
            json.dump({"model": model, "ranks": args.ranks, **results}, f, indent=1)
        with open(os.path.join(args.out, "meta_init.md"), "w") as f:
            f.write(f"Command: python scripts/bench_meta_init.py --d-model {args.d_model} --layers {args.layers} "
                    f"--out {args.out}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
