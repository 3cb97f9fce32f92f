"""Per-step metrics (`metrics.jsonl`), the measured bubble fraction, and the end-of-run summary.

One JSON object per line and per step. When a run resumes from step N, the file is first rewritten to
keep only steps <= N, so a step that runs again after a restart supersedes the record written before.
"""
from __future__ import annotations

import json
import os
import resource
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

METRICS = "metrics.jsonl"


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics file, skipping a line cut short by a crash."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                out.append(rec)
    return out


class MetricsWriter:
    """Appends one JSON line per step; on resume from `done_steps`, drops records of later steps first.

    The file is rewritten (the dropped records, or an earlier run's, removed) only when the first record
    of this run is written: a run that fails before finishing a step leaves metrics.jsonl as it was."""

    def __init__(self, out_dir: str, done_steps: int):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, METRICS)
        old = read_metrics(self.path)
        self._kept = [r for r in old if r["step"] <= done_steps] if done_steps > 0 else []
        self.dropped = len({r["step"] for r in old}) - len({r["step"] for r in self._kept})  # steps to run again
        self._file = None

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            os.makedirs(self.out_dir, exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self._kept)
            os.replace(tmp, self.path)
            self._file = open(self.path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass
class BubbleMeter:
    """Sums, over steps, the time this rank spent computing and the wall time of its `sched.step` calls.

    The bubble is the rest: time a rank waited (for a peer, or in warm-up and cool-down).
    """

    busy_s: float = 0.0
    span_s: float = 0.0
    steps: int = 0
    last_events: list = field(default_factory=list)

    def add_step(self, events: Iterable[Any], wall_s: float) -> None:
        spans = [normalize_event(e) for e in events]
        spans = [s for s in spans if s is not None]
        self.last_events = spans
        if not spans:
            return
        self.steps += 1
        self.span_s += max(wall_s, max(s["end"] for s in spans) - min(s["start"] for s in spans))
        self.busy_s += sum(s["end"] - s["start"] for s in spans if s["compute"])

    def fraction(self) -> float | None:
        """Idle share of this rank's step time, or None when no timings were recorded."""
        return None if self.span_s <= 0 else max(0.0, 1.0 - self.busy_s / self.span_s)


_COMPUTE = ("F", "B", "I", "W")


def normalize_event(ev: Any) -> dict | None:
    """{action, start, end (seconds), compute} from one record of `sched.trace_events()`.

    Reads Chrome trace events (`name`, `ts` and `dur` in microseconds) and plain records with
    `action`/`name` and `start`/`end` (or `start` and `dur`) in seconds; gives None for anything else.
    """
    get = ev.get if isinstance(ev, dict) else (lambda k, d=None: getattr(ev, k, d))
    action = get("action", None) or get("name", None)
    if get("ts", None) is not None:
        start = get("ts") / 1e6
        end = start + (get("dur", 0.0) or 0.0) / 1e6
    else:
        start = get("start", None)
        end = get("end", None)
        if end is None and start is not None and get("dur", None) is not None:
            end = start + get("dur")
    if action is None or start is None or end is None:
        return None
    return {"action": str(action), "start": float(start), "end": float(end),
            "compute": _kind_of(str(action)) in _COMPUTE}


def _kind_of(action: str) -> str:
    """'2F5' -> 'F', '0SEND_F3' -> 'SEND_F'."""
    core = action.split(":")[0].lstrip("0123456789")
    return core.rstrip("0123456789")


def chrome_trace(events_by_rank: dict[int, list[dict]]) -> dict:
    """A Chrome/Perfetto trace (one row per rank) of normalized events; time 0 is the step's start."""
    starts = [e["start"] for evs in events_by_rank.values() for e in evs]
    t0 = min(starts) if starts else 0.0
    out = []
    for rank, evs in sorted(events_by_rank.items()):
        for e in evs:
            out.append({"name": e["action"], "cat": "compute" if e["compute"] else "comm", "ph": "X",
                        "ts": (e["start"] - t0) * 1e6, "dur": (e["end"] - e["start"]) * 1e6,
                        "pid": 0, "tid": rank})
    return {"traceEvents": out, "displayTimeUnit": "ms"}


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or on CPU the process's peak resident set size, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def summary_lines(steps: int, tokens: int, seconds: float, tokens_per_s: float, per_rank: list[dict],
                  device_type: str, steps_redone: int = 0,
                  measured_over: str = "steps after the first, checkpoint saves excluded") -> list[str]:
    """The end-of-run report: throughput (over `measured_over`), steps redone after restarts, bubble
    fraction and peak memory per rank."""
    mem = "peak GPU memory" if device_type == "cuda" else "peak RSS"
    lines = [f"done: {count(steps, 'step')}, {tokens:,} tokens in {seconds:.1f}s; throughput {format_rate(tokens_per_s)} tok/s "
             f"({measured_over})",
             f"steps redone after restarts: {steps_redone}"]
    bubbles = [r["bubble"] for r in per_rank if r.get("bubble") is not None]
    if bubbles:
        lines.append(f"bubble fraction (measured, mean over ranks): {sum(bubbles) / len(bubbles):.1%}")
    for r in per_rank:
        b = "n/a" if r.get("bubble") is None else f"{r['bubble']:.1%}"
        replayed = f", {r['graph_replays']} forwards replayed as CUDA graphs" if "graph_replays" in r else ""
        if "compiles" in r:
            replayed += f", {r['compiles']} graphs compiled"
        lines.append(f"  rank {r['rank']}: stages {r['stages']}, bubble {b}, {mem} {r['peak_mem_gib']:.2f} GiB"
                     f"{replayed}")
    return lines


def count(n: int, noun: str) -> str:
    """`n` and `noun`, plural unless n is 1: count(1, "step") -> "1 step", count(3, "batch") -> "3 batches"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith(('s', 'ch', 'sh', 'x')) else 's'}"


def format_rate(x: float) -> str:
    """12345 -> '12.3k'."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"
