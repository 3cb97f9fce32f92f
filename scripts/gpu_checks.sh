#!/usr/bin/env bash
# Correctness on GPUs over NCCL: every schedule against the unsplit model, and the TP cases.
#   scripts/gpu_checks.sh [NPROC]    (NVLink multicast off, as the lent H200s need)
set -u
. "$(dirname "$0")/gpu_env.sh"
cd "$REPO" || exit 1
NPROC=${1:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
rc=0
echo "== every schedule vs the unsplit model, $NPROC ranks, NCCL"
python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" scripts/check_schedules.py || rc=1
echo "== TP cases, 2 ranks, NCCL"
python3 scripts/tp_check.py || rc=1
exit $rc
