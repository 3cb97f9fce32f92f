#!/usr/bin/env bash
# PP x TP x DP on 2 GPUs over NCCL: {pp:1,tp:2}, {pp:1,dp:2} and {pp:2} resumed from the tp2 checkpoint
# must give the losses of a {pp:2} run.   scripts/check_parallel.sh   (NVLink multicast off)
set -u
. "$(dirname "$0")/gpu_env.sh"
export OMP_NUM_THREADS=1
cd "$REPO" || exit 1
python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count())'
cat > /tmp/c.yaml <<'Y'
model: {name: gpt, vocab_size: 256, d_model: 256, n_layers: 4, n_heads: 8, seq_len: 128}
parallel: {timeout_s: 120}
schedule: {name: 1F1B, microbatches: 4}
train: {steps: 8, batch_size: 16, lr: 0.003, seed: 0, warmup_steps: 2}
checkpoint: {every: 4, resume: false}
Y
run() { python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m pp.run /tmp/c.yaml "$@" 2>&1 | grep -v "^step\|W[0-9]" | tail -4; }
run --parallel.pp 2 --output.dir /tmp/ref
run --parallel.pp 1 --parallel.tp 2 --output.dir /tmp/tp
run --parallel.pp 1 --parallel.dp 2 --output.dir /tmp/dp
mkdir -p /tmp/res/checkpoints && cp -r /tmp/tp/checkpoints/step-4 /tmp/res/checkpoints/
run --parallel.pp 2 --output.dir /tmp/res --checkpoint.resume true
python3 - <<'P'
import json
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"/tmp/{d}/metrics.jsonl"))}
ref = losses("ref")
for d in ("tp", "dp", "res"):
    got = losses(d)
    worst = max(abs(got[s] - ref[s]) / abs(ref[s]) for s in got)
    print(d, "steps", sorted(got), "max rel diff vs pp2", f"{worst:.2e}", "OK" if worst < 1e-4 else "MISMATCH")
print("ref", [round(ref[s], 4) for s in sorted(ref)])
P
