"""Where a GPU waits: the device's idle gaps in a torch.profiler Chrome trace, and what the host did then.

    python scripts/profile_gaps.py runs/x/profile/rank0.json [--top 12]

Prints the span of the traced step on the device (first kernel start to last kernel end), the time some
kernel or copy ran (their union), the idle rest, and the largest gaps with the kernels on either side and
the host operations (outermost `cpu_op` / user annotations) running at the gap's middle. Times in ms.
"""
from __future__ import annotations

import argparse
import gzip
import json


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args()
    events = [e for e in load(a.trace) if e.get("ph") == "X" and "dur" in e]
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    if not device:
        print("no device activity in", a.trace)
        return
    busy, gaps, end = 0.0, [], device[0]["ts"]
    prev = None
    for e in device:
        s, t = e["ts"], e["ts"] + e["dur"]
        if s > end:
            gaps.append((s - end, end, prev, e))
        busy += max(0.0, t - max(s, end))
        if t > end:
            end, prev = t, e
    span = end - device[0]["ts"]
    print(f"device span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms ({busy / span:.1%}), "
          f"idle {(span - busy) / 1e3:.2f} ms in {len(gaps)} gaps "
          f"({sum(g[0] for g in gaps if g[0] > 100) / 1e3:.2f} ms in gaps over 0.1 ms)")
    for dur, start, before, after in sorted(gaps, key=lambda g: -g[0])[:a.top]:
        mid = start + dur / 2
        around = [h for h in host if h["ts"] <= mid <= h["ts"] + h["dur"]]
        names = [h["name"] for h in sorted(around, key=lambda h: -h["dur"])][:4]
        print(f"  {dur / 1e3:8.3f} ms at +{(start - device[0]['ts']) / 1e3:9.2f} ms  after "
              f"{before['name'][:40] if before else '-'!r} before {after['name'][:40]!r}; host: {names}")


if __name__ == "__main__":
    main()
