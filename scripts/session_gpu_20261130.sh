#!/usr/bin/env bash
# One 2xH200 lease: issue 16 (pp.run hf Llama, T5), issue 17 (bf16-mixed with weight copies), issue 20 (auto).
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
OUT=${1:?OUT_DIR}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
nvidia-smi -L > "$OUT/device.txt"; "$PYTHON" -c "import torch;print(torch.__version__)" >> "$OUT/device.txt"
R="$PYTHON -m torch.distributed.run --standalone --nproc-per-node 2"
echo "== T5"; timeout 150 $R scripts/hf_t5_gpu_check.py --steps 3 2>&1 | grep -v "^W1" | tee "$OUT/t5.txt" | tail -3
echo "== bf16-mixed copies"; timeout 240 $R scripts/bench_memory.py --warmup 1 --steps 3 --out "$OUT/mixed.jsonl" --configs pp:1F1B:none:bf16-mixed:0:2:1,pp:1F1B:none:bf16-mixed-percast:0:2:1,pp:1F1B:none:bf16:0:2:1,pp:ZBVZeroBubble:none:bf16-mixed:0:2:1,pp:ZBVZeroBubble:none:bf16:0:2:1 2>&1 | grep -v "^W1" | cut -c1-400 | tail -6
echo "== pp.run hf Llama"; timeout 200 $R -m pp.run configs/hf-llama-2gpu.yaml --train.steps 12 --output.dir "$OUT/hf-llama" 2>&1 | grep -v "^W1" | tee "$OUT/hf_llama_run.txt" | tail -6
cat > /tmp/auto.yaml <<'EOY'
model: {name: gpt, vocab_size: 50304, d_model: 2048, n_layers: 16, n_heads: 16, seq_len: 1024}
parallel: {pp: 2}
schedule: {name: auto}
train: {steps: 12, batch_size: 32, precision: bf16-mixed}
checkpoint: {every: 0}
EOY
echo "== auto"; timeout 240 $R -m pp.run /tmp/auto.yaml --output.dir "$OUT/auto" 2>&1 | grep -v "^W1" | tee "$OUT/auto_run.txt" | tail -8
"$PYTHON" -c "import json; s=json.load(open('$OUT/auto/summary.json')); print(s.get('tuned'), s.get('predicted_step_s'), s.get('measured_step_s'), s.get('step_time_ratio'))" | tee "$OUT/auto_ratio.txt"
