"""`python -m pp.plot OUTPUT_DIR`: draw a run's loss curve and its measured schedule timeline as PNGs.

Reads `metrics.jsonl` (-> `loss.png`) and `trace.json` (-> `timeline.png`, one row per rank, one box per
action of the last step, forward / backward / weight-gradient in their own colours).
"""
from __future__ import annotations

import json
import os
import sys

from pp.launcher.metrics import METRICS, read_metrics

COLOURS = {"F": "#4c78a8", "B": "#54a24b", "I": "#54a24b", "W": "#f58518"}
COMM_COLOUR = "#bbbbbb"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(records: list[dict], path: str) -> None:
    plt = _pyplot()
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], color="#4c78a8", label="loss")
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", color="#e45756", label="val_loss")
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.grid(alpha=0.3)
    if all("lr" in r for r in records):
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in records], color="#f58518", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title("loss curve")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _kind(name: str) -> str:
    core = name.split(":")[0].lstrip("0123456789").rstrip("0123456789")
    return core


def plot_timeline(trace: dict, path: str) -> None:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    if not events:
        raise ValueError("it holds no complete events (ph 'X')")
    from pp.schedules.simulate import rank_field

    plt = _pyplot()
    key = rank_field(events)
    ranks = sorted({e[key] for e in events})
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(ranks) + 1.5))
    for e in events:
        kind = _kind(e["name"])
        compute = kind in COLOURS
        y = ranks.index(e[key])
        h = 0.8 if compute else 0.25
        ax.barh(y, e["dur"] / 1e3, left=e["ts"] / 1e3, height=h, color=COLOURS.get(kind, COMM_COLOUR),
                edgecolor="white" if compute else "none", linewidth=0.5)
        if compute and e["dur"] / 1e3 > 0:
            ax.text((e["ts"] + e["dur"] / 2) / 1e3, y, e["name"], ha="center", va="center", fontsize=6,
                    color="white", clip_on=True)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time in the step (ms)")
    ax.set_title("measured schedule timeline (last step): F forward, B/I backward, W weight grads, grey comms")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 1 and args[0] in ("-h", "--help"):
        print("usage: python -m pp.plot OUTPUT_DIR   (writes loss.png and timeline.png there)")
        return 0
    if len(args) != 1:
        print("usage: python -m pp.plot OUTPUT_DIR   (writes loss.png and timeline.png there)", file=sys.stderr)
        return 2
    out = args[0]
    if not os.path.isdir(out):
        print(f"pp.plot: {out!r} is not a directory (expected a run's output.dir, holding {METRICS})", file=sys.stderr)
        return 2
    if not os.path.isfile(os.path.join(out, METRICS)):
        print(f"pp.plot: {out!r} holds no {METRICS} (expected a run's output.dir)", file=sys.stderr)
        return 2
    records = read_metrics(os.path.join(out, METRICS))
    if not records:
        print(f"pp.plot: {os.path.join(out, METRICS)} has no records", file=sys.stderr)
        return 1
    try:
        plot_loss(records, os.path.join(out, "loss.png"))
    except OSError as e:   # loss.png is a directory, out is read-only
        print(f"pp.plot: cannot write {os.path.join(out, 'loss.png')}: {e.strerror or e}", file=sys.stderr)
        return 2
    written = [os.path.join(out, "loss.png")]
    trace_path = os.path.join(out, "trace.json")
    if os.path.exists(trace_path):
        try:
            with open(trace_path) as f:
                plot_timeline(json.load(f), os.path.join(out, "timeline.png"))
            written.append(os.path.join(out, "timeline.png"))
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as e:
            print(f"pp.plot: {trace_path} is not a Chrome trace pp.run wrote ({type(e).__name__}: {e}); "
                  f"timeline skipped", file=sys.stderr)
    else:
        print(f"pp.plot: no {trace_path} (run with output.trace: true); timeline skipped", file=sys.stderr)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
