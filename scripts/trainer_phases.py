"""pp.run itself, with each part of its step timed on the host: where a pp.run step spends its time.

    torchrun --nproc-per-node 1 scripts/trainer_phases.py OUT.jsonl cfg.yaml [--key value ...]

Runs `pp.run.main` unchanged except that these calls are wrapped with host timers (perf_counter, no
device syncs added): the batch (`tokens`/`targets` and the copy to the device), the schedule's step
(`ParallelModel.step`: launching every action; waits only where the schedule waits), the per-step
statistics (`_gather_stats`: its `.tolist()` waits for the device to finish the step), the optimizer step,
and the loop's own work between two steps (metrics file, progress line, bubble meter). Rank 0 writes one
JSON line per step to OUT.jsonl, in milliseconds.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pp.launcher.train as T  # noqa: E402
from pp.run import main  # noqa: E402

OUT = sys.argv[1]
RECORDS: list[dict] = []
_cur: dict = {}
_last_end = [None]


def _timed(fn, key):
    def wrapped(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _cur[key] = _cur.get(key, 0.0) + (time.perf_counter() - t) * 1e3
    return wrapped


_init = T.Trainer.__init__


def _patched_init(self, *a, **k):
    _init(self, *a, **k)
    m = self.rs.model
    m.step = _timed(m.step, "schedule_ms")
    self.rs.optimizer.step = _timed(self.rs.optimizer.step, "optimizer_ms")
    self._gather_stats = _timed(self._gather_stats, "stats_ms")
    if self.batches is not None:
        self.batches.tokens = _timed(self.batches.tokens, "batch_ms")
        self.batches.targets = _timed(self.batches.targets, "batch_ms")


_step = T.Trainer.step


def _patched_step(self, step):
    t = time.perf_counter()
    between = None if _last_end[0] is None else (t - _last_end[0]) * 1e3
    _cur.clear()
    rec = _step(self, step)
    _last_end[0] = time.perf_counter()
    RECORDS.append({"step": step, "step_ms": round(rec["step_time_s"] * 1e3, 2),
                    "loop_between_ms": None if between is None else round(between, 2),
                    **{k: round(v, 2) for k, v in _cur.items()}})
    return rec


T.Trainer.__init__ = _patched_init
T.Trainer.step = _patched_step

if __name__ == "__main__":
    code = main(sys.argv[2:])
    if int(os.environ.get("RANK", "0")) == 0:
        with open(OUT, "w") as f:
            for r in RECORDS:
                f.write(json.dumps(r) + "\n")
    sys.exit(code)
