#!/usr/bin/env bash
# CUDA-graph replay of stages on this machine's GPUs, in one go:
#   1. every schedule, traced and manual, against the unsplit model (check_schedules.py --cuda-graphs),
#      and tests/test_cuda_graphs.py;
#   2. the launcher: configs/tiny.yaml eager and with schedule.cuda_graphs=true, losses compared;
#   3. the tiny-model overhead rows: pp eager, torch.distributed.pipelining, pp replayed (bench.py --suite overhead).
#
#   scripts/cuda_graphs_check.sh OUTDIR [NPROC]        (NPROC: default every GPU)
set -u
. "$(dirname "$0")/gpu_env.sh"
OUT=${1:?usage: scripts/cuda_graphs_check.sh OUTDIR [NPROC]}
NPROC=${2:-$(nvidia-smi -L | wc -l)}
mkdir -p "$OUT"
cd "$REPO" || exit 1
run() { "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --master-port $((29500 + RANDOM % 1000)) "$@"; }
{ nvidia-smi -L; "$PYTHON" -c "import torch; print('torch', torch.__version__)"; } > "$OUT/device.txt" 2>&1
rc=0

run scripts/check_schedules.py --cuda-graphs > "$OUT/check_schedules_graphs.txt" 2>&1 || rc=1
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py > "$OUT/pytest_cuda_graphs.txt" 2>&1 || rc=1

for g in false true; do
  run -m pp.run configs/tiny.yaml --parallel.pp "$NPROC" --train.steps 12 --checkpoint.every 0 \
      --schedule.cuda_graphs "$g" --output.dir "$OUT/launcher-graphs-$g" > "$OUT/launcher_graphs_$g.txt" 2>&1 || rc=1
done
"$PYTHON" - "$OUT" > "$OUT/launcher_compare.txt" 2>&1 <<'PY' || rc=1
import json, sys
out = sys.argv[1]
runs = {g: [json.loads(l) for l in open(f"{out}/launcher-graphs-{g}/metrics.jsonl")] for g in ("false", "true")}
worst = 0.0
for a, b in zip(runs["false"], runs["true"]):
    rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
    worst = max(worst, rel)
    print(f"step {a['step']:3d} loss eager {a['loss']:.6f} graphs {b['loss']:.6f} rel {rel:.1e} "
          f"step time eager {a.get('step_time_s', 0) * 1e3:.1f} ms graphs {b.get('step_time_s', 0) * 1e3:.1f} ms")
print(f"max relative loss difference {worst:.2e}")
sys.exit(0 if worst < 1e-3 else 1)
PY

run scripts/bench.py --suite overhead --warmup 3 --steps 20 --out "$OUT/overhead.jsonl" > "$OUT/overhead_log.txt" 2>&1 || rc=1
tail -n 3 "$OUT"/check_schedules_graphs.txt "$OUT"/pytest_cuda_graphs.txt "$OUT"/launcher_compare.txt
"$PYTHON" - "$OUT/overhead.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("status") == "ok":
        print(f"{r['impl']:5s} {r['schedule']:16s} graphs={bool(r.get('cuda_graphs'))!s:5s} "
              f"step {r['step_time_s'] * 1e3:7.2f} ms  {r['tokens_per_s'] / 1e3:7.1f}k tok/s  peak GiB {r['peak_mem_gib']}")
PY
exit $rc
