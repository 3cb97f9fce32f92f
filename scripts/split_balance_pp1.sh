#!/bin/bash
# per-stage F/B device times of pp.run's split (blocks.9) and the even split (blocks.8), both stages on one GPU
. scripts/gpu_env.sh
D=bench/results/20261201-h200x1
for pt in blocks.9 blocks.8; do
  rm -rf /tmp/sb_$pt
  $PYTHON -m torch.distributed.run --nproc-per-node 1 -m pp.run $D/gpt_pp2_1f1b.yaml --parallel.pp 1 \
    --schedule.name Interleaved1F1B --schedule.stages_per_rank 2 --split.points "[$pt]" --train.steps 8 \
    --output.dir /tmp/sb_$pt 2>&1 | grep -v "Warn\|warn" | tail -3
  $PYTHON - /tmp/sb_$pt/trace.json $pt <<'PY'
import json, sys, collections
t = json.load(open(sys.argv[1])); ev = t["traceEvents"] if isinstance(t, dict) else t
acc = collections.defaultdict(list)
for e in ev:
    if e.get("cat") != "compute": continue
    n = e["name"]; stage = n[0]; kind = n[1]
    acc[(stage, kind)].append(e["dur"] / 1e3)
out = {f"stage{s}_{k}": round(sum(v) / len(v), 3) for (s, k), v in sorted(acc.items())}
print("split at", sys.argv[2], "mean ms per microbatch:", out,
      "F+B per stage:", [round(out[f"stage{s}_F"] + out[f"stage{s}_B"], 3) for s in "01"])
PY
done
