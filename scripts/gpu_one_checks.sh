#!/usr/bin/env bash
# One GPU: what one H200 can check of the engine (NCCL at world 1, CUDA tensors), in one go:
#   1. CUDA-graph replay: every schedule against the unsplit model, tests/test_cuda_graphs.py, the launcher
#      (scripts/cuda_graphs_check.sh OUT 1);
#   2. ParallelModel.clip_grad_norm_ on CUDA (bf16-mixed, V schedule with a tied weight on one rank)
#      against torch.nn.utils.clip_grad_norm_ on the unsplit model;
#   3. the shared-parameter and parallel tests on this machine's torch (gloo ranks).
#   scripts/gpu_one_checks.sh OUTDIR [clip]      (clip: part 2 alone)
set -u
. "$(dirname "$0")/gpu_env.sh"
OUT=${1:?usage: scripts/gpu_one_checks.sh OUTDIR}
mkdir -p "$OUT"
cd "$REPO" || exit 1
rc=0
ONLY=${2:-}
[ -z "$ONLY" ] && { bash scripts/cuda_graphs_check.sh "$OUT/graphs" 1 > "$OUT/graphs.txt" 2>&1 || rc=1; }
"$PYTHON" -m torch.distributed.run --nproc-per-node 1 --master-port $((29500 + RANDOM % 1000)) - > "$OUT/clip_cuda.txt" 2>&1 <<'PY' || rc=1
import sys, torch

import pp
from pp.comms.backend import init_process_group_from_env
from pp.launcher.models import GPT
from pp.launcher.train import lm_loss
init_process_group_from_env()
cfg = dict(vocab_size=64, d_model=32, n_heads=4, n_layers=4, seq_len=16, tie_weights=True)
torch.manual_seed(0)
ref = GPT(**cfg).cuda()
x = torch.randint(0, 64, (8, 16), device="cuda"); y = torch.randint(0, 64, (8, 16), device="cuda")
torch.stack([lm_loss(ref(a), b) for a, b in zip(x.chunk(4), y.chunk(4))]).mean().backward()
want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
torch.manual_seed(0)
par = pp.parallelize(GPT(**cfg), (x[:2],), loss_fn=lm_loss, n_microbatches=4, schedule="ZBVZeroBubble", device="cuda")
par.step(x, target=y)
got = par.clip_grad_norm_(0.1)
assert got.device.type == "cuda" and got.dtype == torch.float32, got
print("norm pp", got.item(), "torch", want.item())
assert abs(got.item() - want.item()) < 1e-4 * want.item()
for n, p in par.named_parameters():
    torch.testing.assert_close(p.grad, dict(ref.named_parameters())[n].grad, rtol=1e-4, atol=1e-6)
print("clip on cuda: ok")
PY
[ -z "$ONLY" ] && "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_shared_params.py tests/test_data.py -k "not bin_run and not resume and not eval_every" > "$OUT/pytest_cpu.txt" 2>&1 || rc=1
tail -n 3 "$OUT"/*.txt "$OUT"/graphs/*.txt 2>/dev/null
exit $rc
