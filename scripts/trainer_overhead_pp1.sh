#!/usr/bin/env bash
# What pp.run's trainer adds to the pipeline's step on one GPU (issue 20's GPT: 16 layers, d_model 2048,
# seq 1024, batch 32, bf16, 16 microbatches of 2): bench.py's step without an optimizer, then pp.run at
# pp 1 as it is, with one step profiled, and pp.run variants given as VARIANT=sed-expression pairs
# (applied to this copy of the tree only).   scripts/trainer_overhead_pp1.sh OUT [NAME=SEDEXPR@FILE ...]
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
OUT=${1:?usage: scripts/trainer_overhead_pp1.sh OUT [NAME=SEDEXPR@FILE ...]}; shift
mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
R1="$PYTHON -m torch.distributed.run --standalone --nproc-per-node 1"
quiet() { grep -v "^W1\|^I1\|warnings.warn\|FutureWarning" | cut -c1-300; }
cat > "$OUT/gpt_pp1.yaml" <<'EOY'
model: {name: gpt, vocab_size: 32768, d_model: 2048, n_layers: 16, n_heads: 16, seq_len: 1024}
parallel: {pp: 1}
schedule: {name: 1F1B, microbatches: 16}
train: {steps: 12, batch_size: 32, precision: bf16, log_every: 1}
checkpoint: {every: 0}
EOY
echo "== bench.py, one GPU, step without optimizer"
timeout 90 $R1 scripts/bench.py --schedule 1F1B --microbatches 16 --warmup 2 --steps 6 --tag single \
    --out "$OUT/bench_single.jsonl" 2>&1 | quiet | tail -1
run() {  # run NAME: pp.run at pp 1, step 6 profiled
  timeout 120 $R1 -m pp.run "$OUT/gpt_pp1.yaml" --output.profile_step 6 --output.dir "/tmp/run_$1" 2>&1 | quiet \
      > "$OUT/run_$1.txt"; grep "tokens/s\|done" "$OUT/run_$1.txt" | tail -2
  cp "/tmp/run_$1/metrics.jsonl" "$OUT/metrics_$1.jsonl" 2>/dev/null
  "$PYTHON" scripts/profile_gaps.py "/tmp/run_$1/profile/rank0.json" > "$OUT/gaps_$1.txt" 2>&1; head -8 "$OUT/gaps_$1.txt"
  gzip -c "/tmp/run_$1/profile/rank0.json" > "$OUT/profile_$1.json.gz" 2>/dev/null
}
echo "== pp.run as it is"; run base
for v in "$@"; do
  name=${v%%=*}; rest=${v#*=}; expr=${rest%@*}; file=${rest##*@}
  cp "$file" "/tmp/orig_$name"; sed -i "$expr" "$file"
  echo "== pp.run, variant $name ($expr on $file)"; run "$name"
  cp "/tmp/orig_$name" "$file"
done
