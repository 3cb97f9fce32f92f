#!/usr/bin/env bash
# One GPU, 2026-12-04 (second call): how step() cuts a batch (field faults: per-microbatch version
# counters, intermediate aliases of a manual stage's inputs, keywords to later stages, the target of a
# batch split along dim 1), on the GPU machine's torch (2.11, CUDA):
#   1. the tests of the changed paths, the field faults on CUDA (two stages on one rank) included;
#   2. the compiled-stage tests that the first call's 330 s limit cut short, one by one with timings.
#   scripts/gpu_session_20261204b.sh OUTDIR
set -u
. "$(dirname "$0")/gpu_env.sh"
OUT=${1:?usage: scripts/gpu_session_20261204b.sh OUTDIR}
mkdir -p "$OUT"
cd "$REPO" || exit 1
nvidia-smi -L > "$OUT/device.txt" 2>&1
"$PYTHON" -c "import torch; print('torch', torch.__version__)" >> "$OUT/device.txt" 2>&1
rc=0
timeout 280 "$PYTHON" -m pytest -q -o addopts="" -p no:cacheprovider -n 8 -rs --durations=15 tests/test_field_inputs.py \
  tests/test_cuda_graphs.py tests/test_stage_chunks.py tests/test_torch_api_compat.py tests/test_wrapped_stages.py \
  tests/test_microbatch.py tests/test_token_mean.py tests/test_split_errors.py > "$OUT/tests.txt" 2>&1 || rc=1
tail -4 "$OUT/tests.txt"
timeout 240 "$PYTHON" -m pytest -v -o addopts="" -p no:cacheprovider -n 8 --durations=0 tests/test_compile.py \
  > "$OUT/compile.txt" 2>&1 || rc=1
grep -E "passed|failed|PASSED|FAILED" "$OUT/compile.txt" | tail -30
exit $rc
