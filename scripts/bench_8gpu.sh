#!/usr/bin/env bash
# Issue 9's model (GPT 32 layers, d_model 4096, 32 heads, seq 2048, bf16, microbatch 1, 32 microbatches):
# pp beside torch.distributed.pipelining for 1F1B, Interleaved1F1B, ZBVZeroBubble, DualPipeV, in one launch;
# with NPROC 8 also pp at PP=4 x DP=2 for the same four schedules (same launch, same results.jsonl).
#   scripts/bench_8gpu.sh OUTDIR [NPROC]     (NPROC 8 on nvidia-h200-x8; fewer ranks run the same model at PP=NPROC)
set -u
. "$(dirname "$0")/gpu_env.sh"
OUTDIR=${1:?usage: scripts/bench_8gpu.sh OUTDIR [NPROC]}
NPROC=${2:-8}
mkdir -p "$OUTDIR"
cd "$REPO" || exit 1
SUITE=pp:1F1B:32,torch:1F1B:32,torch:Interleaved1F1B:32,pp:Interleaved1F1B:32,pp:ZBVZeroBubble:32,torch:ZBVZeroBubble:32,torch:DualPipeV:32,pp:DualPipeV:32
# With 8 ranks, then pp at PP=4 x DP=2 (32 microbatches per replica, gradients averaged over the 2 replicas,
# overlapped with the last backwards), in the same launch and results.jsonl.
if [ "$NPROC" = 8 ]; then
  SUITE=$SUITE,pp:1F1B:32::dp2,pp:Interleaved1F1B:32::dp2,pp:ZBVZeroBubble:32::dp2,pp:DualPipeV:32::dp2
fi
python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" scripts/bench.py --suite "$SUITE" \
    --layers 32 --d-model 4096 --heads 32 --seq 2048 --mb-size 1 --warmup "${WARMUP:-1}" --steps "${STEPS:-3}" \
    --timeout-s 300 --out "$OUTDIR/results.jsonl" --resume 2>&1 | tee "$OUTDIR/log.txt"
python3 scripts/bench_table.py "$OUTDIR/results.jsonl" | tee "$OUTDIR/table.md"
