"""Soak test: the tiny config for thousands of steps on CPU under torchrun, with each rank's memory sampled.

    python scripts/soak.py                      # 2000 steps of configs/tiny.yaml on 4 ranks (~5-10 min)
    python scripts/soak.py --steps 300 --nproc 2 --out /tmp/soak   # a quick look

Every `--every` steps each rank records its resident set size, the number of objects the garbage collector
tracks and the number of live tensors (the rank's training loop is wrapped by this script, not by pp). The
parent writes `<out>/soak.json` (samples and verdict) and `<out>/soak.png`, and says whether memory is
flat: over the last 75% of the steps the fitted RSS slope of every rank must stay under `--max-mib-per-1k`
MiB per 1,000 steps, and the object and tensor counts must not grow. Exit code 0 when flat, 1 otherwise.
Not part of CI (it takes minutes).
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = "soak-rank{}.jsonl"


# --- inside each rank --------------------------------------------------------------------------------

def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _worker(every: int, argv: list[str]) -> int:
    """Run `pp.run` with Trainer.step wrapped to append a sample every `every` steps."""
    import torch

    from pp import run
    from pp.launcher import train

    rank = int(os.environ.get("RANK", "0"))
    step_fn = train.Trainer.step
    state: dict = {}

    def sampled_step(self, step: int) -> dict:
        rec = step_fn(self, step)
        if step == 1 or step % every == 0:
            if "file" not in state:
                state["file"] = open(os.path.join(self.cfg.output.dir, SAMPLES.format(rank)), "w")
            objs = gc.get_objects()
            with warnings.catch_warnings():  # isinstance() on some torch objects warns of deprecations
                warnings.simplefilter("ignore")
                tensors = sum(1 for o in objs if isinstance(o, torch.Tensor))
            sample = {"step": step, "t": time.time(), "rss_mib": _rss_mib(), "gc_objects": len(objs),
                      "tensors": tensors}
            del objs
            state["file"].write(json.dumps(sample) + "\n")
            state["file"].flush()
        return rec

    train.Trainer.step = sampled_step
    return run.main(argv)


# --- the parent ----------------------------------------------------------------------------------------

def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def verdict(samples: dict[int, list[dict]], steps: int, max_mib_per_1k: float) -> dict:
    """Per rank: RSS slope (MiB per 1,000 steps), object and tensor growth over the last 75% of steps."""
    start = steps // 4
    ranks = {}
    for rank, rows in sorted(samples.items()):
        tail = [r for r in rows if r["step"] >= start]
        xs = [r["step"] for r in tail]
        ranks[rank] = {
            "rss_first_mib": rows[0]["rss_mib"], "rss_last_mib": rows[-1]["rss_mib"],
            "rss_max_mib": max(r["rss_mib"] for r in rows),
            "rss_slope_mib_per_1k_steps": 1000 * _slope(xs, [r["rss_mib"] for r in tail]),
            "gc_objects_growth": tail[-1]["gc_objects"] - tail[0]["gc_objects"],
            "gc_objects_slope_per_1k_steps": 1000 * _slope(xs, [r["gc_objects"] for r in tail]),
            "tensors_growth": tail[-1]["tensors"] - tail[0]["tensors"],
        }
    flat = all(r["rss_slope_mib_per_1k_steps"] < max_mib_per_1k and r["gc_objects_slope_per_1k_steps"] < 100
               and r["tensors_growth"] <= 0 for r in ranks.values())
    return {"flat": flat, "window": [start, steps], "max_mib_per_1k_steps": max_mib_per_1k, "ranks": ranks}


def plot(samples: dict[int, list[dict]], result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for rank, rows in sorted(samples.items()):
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["rss_mib"] for r in rows], label=f"rank {rank}")
        axes[1].plot(steps, [r["gc_objects"] for r in rows], label=f"rank {rank}")
        axes[2].plot(steps, [r["tensors"] for r in rows], label=f"rank {rank}")
    for ax, title in zip(axes, ("resident set size (MiB)", "objects tracked by gc", "live tensors")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.axvline(result["window"][0], color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[0].legend()
    slopes = ", ".join(f"{r['rss_slope_mib_per_1k_steps']:+.1f}" for r in result["ranks"].values())
    fig.suptitle(f"soak: {result['config']}, {result['steps']} steps on {result['nproc']} CPU ranks - memory "
                 f"{'flat' if result['flat'] else 'NOT flat'} (RSS slope after the dashed line, MiB/1k steps: "
                 f"{slopes})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--every", type=int, default=25, help="sample every this many steps")
    ap.add_argument("--checkpoint-every", type=int, default=250, help="also exercise checkpoint saves")
    ap.add_argument("--max-mib-per-1k", type=float, default=2.0, help="largest RSS slope counted as flat")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"), help="where soak.json/png go")
    ap.add_argument("--run-dir", default=None, help="the run's output.dir (default: a temporary directory)")
    args = ap.parse_args(argv)
    if args.steps < 8 or args.every < 1:
        ap.error(f"--steps must be >= 8 and --every >= 1, got {args.steps} and {args.every}")

    run_dir = args.run_dir or tempfile.mkdtemp(prefix="pp_soak_")
    for old in glob.glob(os.path.join(run_dir, SAMPLES.format("*"))):
        os.remove(old)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           os.path.abspath(__file__), "--worker", str(args.every), args.config,
           "--train.steps", str(args.steps), "--parallel.pp", str(args.nproc), "--output.dir", run_dir, "--train.log_every", "100",
           "--checkpoint.every", str(args.checkpoint_every), "--checkpoint.keep", "2", "--output.trace", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        print(f"soak: the run failed with exit code {proc.returncode}", file=sys.stderr)
        return 2
    samples = {}
    for rank in range(args.nproc):
        with open(os.path.join(run_dir, SAMPLES.format(rank))) as f:
            samples[rank] = [json.loads(line) for line in f]
    result = verdict(samples, args.steps, args.max_mib_per_1k)
    result.update({"config": os.path.relpath(args.config, REPO), "steps": args.steps, "nproc": args.nproc,
                   "sample_every": args.every, "checkpoint_every": args.checkpoint_every, "wall_s": round(wall, 1),
                   "host": platform.node(), "cpus": os.cpu_count(),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "samples": samples})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(samples, result, os.path.join(args.out, "soak.png"))
    for rank, r in result["ranks"].items():
        print(f"rank {rank}: RSS {r['rss_first_mib']:.0f} -> {r['rss_last_mib']:.0f} MiB (max {r['rss_max_mib']:.0f}), "
              f"slope {r['rss_slope_mib_per_1k_steps']:+.2f} MiB/1k steps; gc objects {r['gc_objects_growth']:+d}, "
              f"tensors {r['tensors_growth']:+d} over steps {result['window'][0]}..{args.steps}")
    print(f"soak: {args.steps} steps in {wall:.0f}s; memory is {'flat' if result['flat'] else 'NOT flat'}; "
          f"wrote {os.path.join(args.out, 'soak.json')} and soak.png")
    return 0 if result["flat"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        sys.exit(_worker(int(sys.argv[2]), sys.argv[3:]))
    sys.exit(main())
