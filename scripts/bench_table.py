"""Markdown table of bench.py results, pp beside torch, with the targets of issue 6 checked.

    python scripts/bench_table.py bench/results/run.jsonl [more.jsonl ...] [--draw TRACE_DIR]

Rows are (schedule, microbatches, split, model, dp); when a configuration ran more than once the last record
wins. Data-parallel runs (`bench.py --dp N`) show `PPp×DPn` in the model column (tokens/s over all replicas,
efficiency per pipeline) and are left out of issue 6's targets. `--draw DIR` also draws every merged trace `DIR/*.json` to `DIR/*.png` (one process, needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET_EFF = {("1F1B", 16): 0.80, ("Interleaved1F1B", 16): 0.86, ("ZBVZeroBubble", 16): 0.88,
              ("DualPipeV", 16): 0.86}
ORDER = ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]
SPLITS = ["even", "cost", "measured"]


def load(paths: list[str]) -> list[dict]:
    recs: dict[str, dict] = {}
    for path in paths:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                print(f"{path}:{n}: not JSON, skipped", file=sys.stderr)
                continue
            recs[rec.get("config") or f"{path}:{n}"] = rec
    return list(recs.values())


def dp_of(r: dict) -> int:
    if r.get("dp"):
        return int(r["dp"])
    tail = (r.get("config") or "").rpartition("-dp")[2]  # key ends in -dpN when dp > 1
    return int(tail) if tail.isdigit() else 1


def model_of(r: dict) -> str:
    m = r.get("model")
    if not m:  # crashed records carry only the key: .../L16d2048h16V32768S1024b2[-dpN]
        return (r.get("config") or "?").split("/")[-1]
    dp = dp_of(r)
    lay = "" if dp == 1 else f" PP{r.get('pp', '?')}×DP{dp}"
    return f"L{m['layers']} d{m['d_model']} S{m['seq']}{lay}"


def row_key(r: dict) -> tuple:
    sched = r.get("schedule", "?")
    return (r.get("tag") or "", model_of(r), ORDER.index(sched) if sched in ORDER else 99, sched,
            int(r.get("microbatches") or 0), SPLITS.index(r["split"]) if r.get("split") in SPLITS else 9,
            r.get("split", "?"), dp_of(r))


def impl_of(r: dict) -> str:
    """'pp', 'torch', or 'pp-graphs' for pp with CUDA-graph replay (bench.py --cuda-graphs)."""
    graphs = r.get("cuda_graphs") or (r.get("config") or "").split("/")[-1].split("-")[1:].count("graphs")
    return "pp-graphs" if r.get("impl") == "pp" and graphs else r.get("impl", "?")


def ok(r: dict | None) -> bool:
    return bool(r) and r.get("status") == "ok"


def cell(r: dict | None, field: str, fmt: str) -> str:
    if r is None:
        return ""
    if not ok(r):
        return r.get("status", "?")
    v = r.get(field)
    return "" if v is None else format(v, fmt)


def peak(r: dict | None) -> float | None:
    if not ok(r):
        return None
    vals = [p for p in r.get("peak_mem_gib") or [] if p is not None]
    return max(vals) if vals else None


def kilo(v: float) -> str:
    return f"{v / 1e3:.1f}k"


def table(recs: list[dict]) -> str:
    rows: dict[tuple, dict[str, dict]] = {}
    for r in recs:
        rows.setdefault(row_key(r), {})[impl_of(r)] = r
    any_rec = next((r for r in recs if ok(r)), recs[0] if recs else {})
    out = [f"Device: {any_rec.get('device', '?')} × {any_rec.get('ranks', '?')}, torch {any_rec.get('torch', '?')}, "
           f"{any_rec.get('date', '?')[:10]}; warm-up {any_rec.get('warmup', '?')}, timed steps "
           f"{any_rec.get('steps', '?')}.", "",
           "| schedule (mb) | split | model | blocks/stage | pp tokens/s | pp eff | pp bal. eff | pp peak GiB | "
           "torch tokens/s | torch eff | torch bal. eff | torch peak GiB | pp / torch |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(rows):
        tag, model, _, sched, mb, _, split, _ = key
        p, t = rows[key].get("pp"), rows[key].get("torch")
        any_r = p or t
        ratio = f"{p['tokens_per_s'] / t['tokens_per_s']:.2f}×" if ok(p) and ok(t) else ""
        pk_p, pk_t = peak(p), peak(t)
        out.append("| " + " | ".join([
            f"{sched} ({mb})", split, model + (f" ({tag})" if tag else ""),
            "-".join(map(str, any_r.get("blocks_per_stage") or [])),
            kilo(p["tokens_per_s"]) if ok(p) else cell(p, "", ""), cell(p, "efficiency", ".2f"),
            cell(p, "balanced_efficiency", ".2f"), "" if pk_p is None else f"{pk_p:.1f}",
            kilo(t["tokens_per_s"]) if ok(t) else cell(t, "", ""), cell(t, "efficiency", ".2f"),
            cell(t, "balanced_efficiency", ".2f"), "" if pk_t is None else f"{pk_t:.1f}", ratio]) + " |")
    graphed = [(k, v) for k, v in sorted(rows.items()) if "pp-graphs" in v]
    if graphed:
        out += ["", "pp with CUDA-graph replay of the stages (`bench.py --cuda-graphs`):", "",
                "| schedule (mb) | split | model | tokens/s | step ms | peak GiB | step / torch's |", "|---|---|---|---|---|---|---|"]
        for (tag, model, _, sched, mb, _, split, _), v in graphed:
            g, t = v["pp-graphs"], v.get("torch")
            q = f"{g['step_time_s'] / t['step_time_s']:.2f}" if ok(g) and ok(t) else ""
            pk = peak(g)
            ms = f"{g['step_time_s'] * 1e3:.1f}" if ok(g) else ""
            out.append(f"| {sched} ({mb}) | {split} | {model}{f' ({tag})' if tag else ''} | "
                       f"{kilo(g['tokens_per_s']) if ok(g) else cell(g, '', '')} | {ms} | "
                       f"{'' if pk is None else f'{pk:.2f}'} | {q} |")
    out += ["", *targets(rows)]
    failed = [r for r in recs if not ok(r)]
    if failed:
        out += ["", "Not measured:"] + [f"- {r.get('config')}: {r.get('status')}: {r.get('error', '')}" for r in failed]
    return "\n".join(out) + "\n"


def targets(rows: dict[tuple, dict[str, dict]]) -> list[str]:
    """Issue 6's targets, each with its numbers and a verdict."""
    lines = ["Targets (issue 6):"]
    big = {k: v for k, v in rows.items() if not k[0] and k[7] == 1}

    def best(impl: str, split: str | None):
        cands = [(v[impl]["tokens_per_s"], k[3], k[4], k[6]) for k, v in big.items()
                 if ok(v.get(impl)) and (split is None or k[6] == split)]
        return max(cands) if cands else None

    def mark(good: bool) -> str:
        return "met" if good else "NOT met"

    for (sched, mb), goal in TARGET_EFF.items():
        r = next((v.get("pp") for k, v in big.items() if k[3] == sched and k[4] == mb and k[6] == "even"), None)
        if ok(r):
            lines.append(f"- pp {sched} ({mb}) efficiency {r['efficiency']:.2f} ≥ {goal}: {mark(r['efficiency'] >= goal)}")
    bt = best("torch", "even")
    if bt:
        for split, goal in (("even", 1.20), ("cost", 1.30), ("measured", 1.30)):
            bp = best("pp", split)
            if bp:
                lines.append(f"- best pp ({split} split: {bp[1]} ({bp[2]}), {kilo(bp[0])}) / best torch (even: "
                             f"{bt[1]} ({bt[2]}), {kilo(bt[0])}) = {bp[0] / bt[0]:.2f}× ≥ {goal}×: {mark(bp[0] / bt[0] >= goal)}")
    worse = []
    compared = 0
    for k, v in big.items():
        p, t = v.get("pp"), v.get("torch")
        if ok(p) and ok(t) and p.get("peak_mem_gib") and t.get("peak_mem_gib") and None not in p["peak_mem_gib"]:
            compared += 1
            over = [f"rank {i}: {a:.2f} > {b:.2f}" for i, (a, b) in enumerate(zip(p["peak_mem_gib"], t["peak_mem_gib"]))
                    if b is not None and a > b]
            if over:
                worse.append(f"{k[3]} ({k[4]}) {k[6]}: " + ", ".join(over))
    if compared:
        lines.append(f"- peak memory per rank ≤ torch's, same schedule ({compared} pairs): {mark(not worse)}"
                     + ("" if not worse else "; " + "; ".join(worse)))
    for k, v in rows.items():
        for impl in ("pp", "pp-graphs"):
            if k[0] == "overhead" and ok(v.get(impl)) and ok(v.get("torch")):
                q = v[impl]["step_time_s"] / v["torch"]["step_time_s"]
                lines.append(f"- overhead, {k[1]}, {k[3]} ({k[4]}): {impl} step {v[impl]['step_time_s'] * 1e3:.1f} ms / "
                             f"torch {v['torch']['step_time_s'] * 1e3:.1f} ms = {q:.2f} ≤ 0.7: {mark(q <= 0.7)}")
    return lines


def draw(trace_dir: str) -> None:
    import contextlib

    from pp.schedules.show import main as show

    for path in sorted(Path(trace_dir).glob("*.json")):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # its one line per picture is not table material
                show([path.stem, "--trace", str(path), "-o", str(path.with_suffix(".png"))])
        except Exception as e:  # noqa: BLE001 - one bad trace must not stop the others
            print(f"{path}: {type(e).__name__}: {e}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON-lines files written by bench.py")
    p.add_argument("--draw", metavar="TRACE_DIR", default=None, help="also draw DIR/*.json traces to PNGs")
    args = p.parse_args(argv)
    missing = [r for r in args.results if not Path(r).is_file()]
    if missing:
        print(f"bench_table: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    recs = load(args.results)
    if not recs:
        print(f"bench_table: no records in {', '.join(args.results)}", file=sys.stderr)
        return 2
    sys.stdout.write(table(recs))
    if args.draw:
        draw(args.draw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
