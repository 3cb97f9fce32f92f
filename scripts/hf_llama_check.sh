#!/usr/bin/env bash
# Issue 16 item 6 on 2 GPUs: a Hugging Face Llama (16 layers, hidden 2048, MLP 5632, 16/8 heads, vocab 32000,
# seq 1024, microbatch 2, bf16, sdpa) through pp.pipeline under every schedule, beside the whole model on one
# GPU (gradient accumulation) and the traced-vs-eager cost on one GPU.
#   REF=path/to/shared/bench scripts/hf_llama_check.sh OUT_DIR
# REF holds the reference scripts hf_llama_bench.py and hf_traced_cost.py (../shared/bench, copied into a
# git-ignored folder of the checkout to travel to a GPU machine).
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
OUT=${1:?usage: REF=DIR scripts/hf_llama_check.sh OUT_DIR}
REF=${REF:?set REF to the folder with hf_llama_bench.py and hf_traced_cost.py}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } > "$OUT/device.txt" 2>&1
echo "== one GPU, whole model, gradient accumulation"
timeout 150 "$PYTHON" "$REF/hf_llama_bench.py" --single 2>&1 | tee "$OUT/single.txt" | tail -3
echo "== one GPU, traced pipe vs eager (forward+backward)"
timeout 150 "$PYTHON" "$REF/hf_traced_cost.py" 2>&1 | tee "$OUT/traced_cost.txt" | tail -6
echo "== 2 GPUs, pp, every schedule (16 microbatches)"
timeout 330 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 "$REPO/scripts/bench.py" --model hf-llama \
    --suite "pp:1F1B:16,pp:GPipe:16,pp:Interleaved1F1B:16,pp:ZBVZeroBubble:16,pp:DualPipeV:16" \
    --warmup 2 --steps 4 --out "$OUT/pp.jsonl" 2>&1 | grep -v "^W1" | tail -12
echo "== 2 GPUs, torch.distributed.pipelining on the same model"
timeout 90 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 "$REF/hf_llama_bench.py" --impl torch \
    --schedule 1F1B 2>&1 | grep -v "^W1" | tail -4 | tee "$OUT/torch.txt"
