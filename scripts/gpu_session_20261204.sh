#!/usr/bin/env bash
# One GPU, 2026-12-04: the executor now runs every F, B/I and W through torch's chunk methods
# (forward_one_chunk, ...) and custom functions. On the GPU machine's torch (2.11, CUDA):
#   1. the tests of the changed paths (chunk methods, custom functions, CUDA graphs, compiled stages,
#      the I/W split, precision copies, torch's zoo schedules);
#   2. the host-side cost per step on the tiny model (host-bound: 8 layers, d_model 512, seq 128, 16
#      microbatches, one rank), eager and with CUDA graphs, at this commit and at 14b3438 (before it).
#   scripts/gpu_session_20261204.sh OUTDIR
set -u
. "$(dirname "$0")/gpu_env.sh"
OUT=${1:?usage: scripts/gpu_session_20261204.sh OUTDIR}
mkdir -p "$OUT"
cd "$REPO" || exit 1
nvidia-smi -L > "$OUT/device.txt" 2>&1
"$PYTHON" -c "import torch; print('torch', torch.__version__)" >> "$OUT/device.txt" 2>&1
rc=0
timeout 330 "$PYTHON" -m pytest -q -o addopts="" -p no:cacheprovider -n 8 tests/test_stage_chunks.py \
  tests/test_cuda_graphs.py tests/test_compile.py tests/test_torch_signatures.py tests/test_backward_split.py \
  tests/test_torch_zoo_schedules.py tests/test_precision_copies.py > "$OUT/tests.txt" 2>&1 || rc=1
tail -3 "$OUT/tests.txt"
TINY="--schedule 1F1B --microbatches 16 --layers 8 --d-model 512 --heads 8 --seq 128 --mb-size 2 --warmup 3 --steps 20"
OLD=/tmp/pp-before
if git rev-parse -q --verify 14b3438^{commit} > /dev/null 2>&1; then
  rm -rf "$OLD" && mkdir -p "$OLD" && git archive 14b3438 | tar -x -C "$OLD"
else
  echo "no git history here: only this commit is timed" > "$OUT/before.txt"; OLD=""
fi
for rep in 1 2; do
  for tree in "$REPO" $OLD; do
    tag=$([ "$tree" = "$REPO" ] && echo now || echo before)
    for graphs in "" "--cuda-graphs"; do
      (cd "$tree" && PYTHONPATH="$tree" timeout 100 torchrun --nproc-per-node 1 --master-port 29611 scripts/bench.py \
        --impl pp $TINY $graphs --tag "$tag${graphs:+-graphs}-$rep" --out "$OUT/host.jsonl") \
        >> "$OUT/host_log.txt" 2>&1 || rc=1
    done
  done
done
"$PYTHON" - "$OUT/host.jsonl" <<'PY' || true
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    t = r.get("step_time_s")
    print(f"{r.get('tag'):>22}  {r.get('status')}  step {t * 1e3 if t else float('nan'):.2f} ms  "
          f"min {(r.get('step_time_min_s') or float('nan')) * 1e3:.2f} ms")
PY
exit $rc
