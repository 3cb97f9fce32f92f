"""Draw a schedule's timeline: `python -m pp.schedules.show 1F1B --ranks 4 --microbatches 8 -o 1f1b.png`.

Simulates a named schedule (or a CSV of action lists, or draws a recorded Chrome trace), saves a PNG
with one row per rank, and prints one line with the bubble fraction.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from pp.schedules.actions import Action, Kind
from pp.schedules.simulate import TimelineEvent, bubble_fraction, from_chrome_trace, simulate

COLORS = {Kind.F: "#4c72b0", Kind.B: "#55a868", Kind.I: "#dd8452", Kind.W: "#8172b3"}
NAMES = {Kind.F: "F forward", Kind.B: "B backward", Kind.I: "I input grad", Kind.W: "W weight grad"}


def _lighter(color: str, amount: float) -> str:
    """Mix `color` with white: later stages of the same rank get lighter shades of their kind's colour."""
    rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * amount):02x}" for c in rgb)


def draw_timeline(events: Sequence[TimelineEvent], path: str | Path, title: str, xlabel: str = "time") -> None:
    """Save a PNG of `events`: ranks as rows (rank 0 on top), compute boxes coloured by kind with the
    microbatch number inside where it fits; idle time shows as the empty grey lane."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    events = [e for e in events if e.action.is_compute]
    ranks = sorted({e.rank for e in events}) or [0]
    t0 = min((e.start for e in events), default=0.0)
    span = max((e.end for e in events), default=1.0) - t0 or 1.0
    shortest = min((e.end - e.start for e in events if e.end > e.start), default=span)
    width = min(max(8.0, 2.0 + 0.22 * span / shortest), 32.0)
    fig, ax = plt.subplots(figsize=(width, 0.9 + 0.45 * len(ranks)))
    row = {r: i for i, r in enumerate(ranks)}
    chunk = {}  # (rank, stage) -> index of the stage among the rank's stages
    for r in ranks:
        for i, s in enumerate(sorted({e.action.stage for e in events if e.rank == r})):
            chunk[(r, s)] = i
    for r in ranks:
        ax.barh(row[r], span, left=0.0, height=0.8, color="#eeeeee", edgecolor="none")
    px_per_unit = width * 0.8 * fig.dpi / span
    for e in events:
        kind = e.action.kind
        color = _lighter(COLORS[kind], min(0.6, 0.4 * chunk[(e.rank, e.action.stage)]))
        ax.barh(row[e.rank], e.end - e.start, left=e.start - t0, height=0.8, color=color, edgecolor="white", linewidth=0.5)
        label = str(e.action.microbatch)
        if (e.end - e.start) * px_per_unit >= 7 * len(label) + 2:
            ax.text((e.start + e.end) / 2 - t0, row[e.rank], label, ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_xlim(0, span)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    kinds = [k for k in COLORS if any(e.action.kind == k for e in events)]
    ax.legend(handles=[Patch(color=COLORS[k], label=NAMES[k]) for k in kinds], loc="upper center",
              bbox_to_anchor=(0.5, -0.12 - 0.6 / (1 + len(ranks))), ncol=max(1, len(kinds)), frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)


def _placement_of(lists: dict[int, list[Action]]) -> list[int]:
    """stage_to_rank read off user-written lists: every stage must live on exactly one rank."""
    where: dict[int, int] = {}
    for r, acts in lists.items():
        for a in acts:
            if where.setdefault(a.stage, r) != r:
                raise ValueError(f"stage {a.stage} appears on rank {where[a.stage]} "
                                 f"and on rank {r}; a stage lives on one rank")
    missing = [s for s in range(max(where, default=-1) + 1) if s not in where]
    if not where or missing:
        raise ValueError(f"the lists never run stage(s) {missing or [0]}: stages must be numbered 0..n-1")
    return [where[s] for s in range(len(where))]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        print(f"{self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _events(args: argparse.Namespace) -> tuple[list[TimelineEvent], int, int, str]:
    """The timeline to draw, with its rank count, microbatch count and x-axis label."""
    if args.trace:
        events = from_chrome_trace(args.trace)
        if not events:
            raise ValueError(f"{args.trace} has no complete events named like actions ('2F5')")
        return events, len({e.rank for e in events}), 1 + max(e.action.microbatch for e in events), "time (µs)"
    if args.csv:
        from pp.schedules.csvio import read_actions
        from pp.schedules.validate import validate, validate_compute

        lists = read_actions(args.csv)
        placement = _placement_of(lists)
        n_mb = 1 + max(a.microbatch for acts in lists.values() for a in acts)
        lowered = any(a.is_comm for acts in lists.values() for a in acts)
        (validate if lowered else validate_compute)(lists, placement, n_mb)
        return simulate(lists, placement), max(placement) + 1, n_mb, "time (F=1, B=2, I=W=1)"
    from pp.schedules.registry import build_lists

    placement, lists = build_lists(args.name, args.ranks, args.microbatches, args.stages_per_rank)
    return simulate(lists, placement), args.ranks, args.microbatches, "time (F=1, B=2, I=W=1)"


_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _bad_output(path: str | None) -> str | None:
    """Why the timeline cannot be written to `path` (None when it can, or when no path was given)."""
    if path is None:
        return None
    if os.path.isdir(path):
        return f"is a directory; expected an image file such as {os.path.join(path, 'timeline.png')}"
    if os.path.splitext(path)[1].lower() not in _FORMATS:
        return f"expected a file ending in {', '.join(_FORMATS)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: draw the timeline, print `NAME ranks=R microbatches=M bubble=X`; exit 2 on bad input."""
    parser = _Parser(prog="python -m pp.schedules.show", description=__doc__)
    parser.add_argument("name", nargs="?", default=None,
                        help="schedule name (GPipe, 1F1B, Interleaved1F1B, ...), or a label with --trace/--csv "
                             "(default there: the file's name)")
    parser.add_argument("--ranks", type=_positive, default=4, help="pipeline ranks (default 4)")
    parser.add_argument("--microbatches", type=_positive, default=8, help="microbatches per step (default 8)")
    parser.add_argument("--stages-per-rank", type=_positive, default=None, help="stages per rank for looped schedules (default 2)")
    parser.add_argument("-o", "--output", default=None, help="PNG to write (default <name>.png)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--trace", default=None, help="draw this recorded Chrome trace instead of simulating")
    source.add_argument("--csv", default=None, help="simulate the action lists in this CSV file (one row per rank)")
    args = parser.parse_args(argv)
    if args.trace or args.csv:
        args.ranks = args.microbatches = None
        if args.name is None:   # pp.run's runs/X/trace.json: labelled X-trace
            path = os.path.abspath(args.trace or args.csv)
            stem = os.path.splitext(os.path.basename(path))[0]
            args.name = f"{os.path.basename(os.path.dirname(path))}-{stem}" if args.trace else stem
    elif args.name is None:
        parser.error("the following arguments are required: name (a schedule, or --trace/--csv FILE)")
    bad_output = _bad_output(args.output)
    if bad_output:
        print(f"{parser.prog}: -o {args.output}: {bad_output}", file=sys.stderr)
        return 2
    try:
        events, n_ranks, n_mb, xlabel = _events(args)
    except ValueError as err:  # ScheduleError included
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 2
    bubble = bubble_fraction(events, n_ranks)
    output = args.output or f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in args.name)}.png"
    try:
        draw_timeline(events, output, f"{args.name}: {n_ranks} ranks, {n_mb} microbatches, bubble {bubble:.3f}", xlabel)
    except OSError as err:
        print(f"{parser.prog}: cannot write {output}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"{args.name} ranks={n_ranks} microbatches={n_mb} bubble={bubble:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
