#!/usr/bin/env bash
# The table of issue 6, pp beside torch.distributed.pipelining, in ONE torchrun launch (scripts/bench.py
# --suite issue6: every configuration runs in the same process group, so torch import and NCCL set-up are
# paid once). If a configuration kills the job, the launch is repeated with --resume: finished
# configurations are kept, the one that died is recorded as "crashed", the rest run.
#
#   scripts/bench_all.sh [OUTDIR] [extra bench.py flags...]
#
# OUTDIR (default bench/results/<UTC date-time>) receives results.jsonl, table.md, log.txt and traces/
# (merged Chrome traces of one recorded pp step per configuration, drawn to PNG when matplotlib is there).
# Environment: NPROC (4), WARMUP (2), STEPS (6), BUDGET_S (450: seconds for the launches, all attempts
# together), SUITE (issue6), PYTHON (python3), DRAW (1).
set -u
. "$(dirname "$0")/gpu_env.sh"
OUTDIR=${1:-$REPO/bench/results/$(date -u +%Y%m%d-%H%M%S)}
[ $# -gt 0 ] && shift
NPROC=${NPROC:-4}
WARMUP=${WARMUP:-2}
STEPS=${STEPS:-6}
BUDGET_S=${BUDGET_S:-450}
SUITE=${SUITE:-issue6}
DRAW=${DRAW:-1}

# NVLink multicast off (the lead sets these too; defaults here so that no run forgets them).

mkdir -p "$OUTDIR/traces"
RESULTS="$OUTDIR/results.jsonl"
LOG="$OUTDIR/log.txt"
cd "$REPO" || exit 1
echo "bench_all: $NPROC ranks, suite $SUITE, warm-up $WARMUP, steps $STEPS -> $OUTDIR" | tee -a "$LOG"

attempt=0
rc=1
while [ $attempt -lt 5 ]; do
  left=$((BUDGET_S - SECONDS))
  if [ $left -lt 45 ]; then
    echo "bench_all: $left s of the budget left, not starting another launch" | tee -a "$LOG"
    break
  fi
  attempt=$((attempt + 1))
  port=$((29500 + RANDOM % 1000))
  echo "bench_all: launch $attempt (time limit ${left}s)" | tee -a "$LOG"
  timeout --kill-after 15 "$left" "$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" \
      --master-addr 127.0.0.1 --master-port "$port" \
      scripts/bench.py --suite "$SUITE" --warmup "$WARMUP" --steps "$STEPS" --timeout-s 120 \
      --out "$RESULTS" --trace "$OUTDIR/traces" --resume "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] && break
  echo "bench_all: launch $attempt exited with $rc; resuming after the configuration that died" | tee -a "$LOG"
done

if [ ! -s "$RESULTS" ]; then
  echo "bench_all: no results in $RESULTS (see $LOG)" >&2
  exit 1
fi
draw=()
if [ "$DRAW" = 1 ] && "$PYTHON" -c "import matplotlib" 2>/dev/null; then
  draw=(--draw "$OUTDIR/traces")
fi
"$PYTHON" scripts/bench_table.py "$RESULTS" ${draw[@]+"${draw[@]}"} | tee "$OUTDIR/table.md"
echo "bench_all: done in ${SECONDS}s (last launch exit $rc): $OUTDIR"
[ "$rc" -eq 0 ]
