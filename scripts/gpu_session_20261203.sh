#!/usr/bin/env bash
# One GPU, 2026-12-03: this session's changes on the GPU machine's torch (2.11, CUDA):
#   1. pp.run with a Hugging Face Llama in pure bf16 and bf16-mixed on CUDA (pure bf16 is now traced in
#      bf16); step 1's loss against transformers' own model in bf16 on the same batch;
#   2. this session's new tests (gloo ranks) on this torch, and the CUDA-graph tests of the last stage's loss.
#   scripts/gpu_session_20261203.sh OUTDIR
set -u
. "$(dirname "$0")/gpu_env.sh"
OUT=${1:?usage: scripts/gpu_session_20261203.sh OUTDIR}
mkdir -p "$OUT"
cd "$REPO" || exit 1
nvidia-smi -L > "$OUT/device.txt" 2>&1
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$OUT/device.txt" 2>&1
rc=0
cat > "$OUT/llama.yaml" <<'YAML'
model:
  name: hf:LlamaForCausalLM
  config: {hidden_size: 256, intermediate_size: 688, num_hidden_layers: 4, num_attention_heads: 4,
           num_key_value_heads: 2, vocab_size: 256, max_position_embeddings: 256}
  seq_len: 256
parallel: {pp: 1}
schedule: {name: 1F1B, microbatches: 4}
train: {steps: 3, batch_size: 8, lr: 3.0e-4, warmup_steps: 0, seed: 0}
checkpoint: {every: 0}
YAML
for prec in bf16 bf16-mixed; do
  timeout 240 "$PYTHON" -m pp.run "$OUT/llama.yaml" --train.precision $prec --output.dir "$OUT/run-$prec" \
    > "$OUT/run-$prec.txt" 2>&1 || rc=1
done
timeout 120 "$PYTHON" - "$OUT" > "$OUT/unsplit_bf16.txt" 2>&1 <<'PY' || rc=1
import json, sys, torch
from pp.launcher.config import load_config
from pp.launcher.data import ByteBatches, load_corpus
from pp.launcher.models import build_model
from pp.launcher.train import lm_loss
out = sys.argv[1]
c = load_config(out + "/llama.yaml")
model = build_model(c.model, c.train.seed).to(torch.bfloat16).cuda()
data = ByteBatches(load_corpus(c.train.data), c.train.batch_size, c.model.seq_len, c.train.seed)
m = c.schedule.microbatches
with torch.no_grad():
    want = torch.stack([lm_loss(model(x.cuda()), y.cuda()) for x, y in
                        zip(data.tokens(1).chunk(m), data.targets(1).chunk(m))]).float().mean().item()
got = [json.loads(l) for l in open(out + "/run-bf16/metrics.jsonl") if '"loss"' in l][0]["loss"]
print("step 1 loss: pp.run bf16", got, "transformers bf16", want)
assert abs(got - want) < 2e-3 * want
print("ok")
PY
timeout 500 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_hf_labels.py tests/test_replica_refusal.py \
  tests/test_precision_edges.py tests/test_launcher_checkpoint.py \
  "tests/test_hf_launcher.py::test_pure_bf16_llama_trains_with_the_unsplit_bf16_models_loss" \
  > "$OUT/pytest_new.txt" 2>&1 || rc=1
tail -n 3 "$OUT"/*.txt
exit $rc
