#!/usr/bin/env bash
# One GPU (torch 2.11 there): tests of mended faults on that torch (gloo, CPU), then the CUDA-graph tests
# on the GPU (the runtime's forward and backward changed). Without arguments, the eleventh session's
# tests (2026-12-02); with arguments, those pytest targets instead.
#   OUT=dir bash scripts/gpu_fault_checks.sh [pytest targets...]
set -u
OUT=${OUT:?set OUT to an output directory}; mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)" | tee $OUT/versions.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a $OUT/versions.txt
if [ $# -eq 0 ]; then
  set -- tests/test_stage_outputs.py \
  tests/test_user_checkpointing.py tests/test_meta_buffers.py tests/test_train_eval_mode.py tests/test_step_abort.py \
  tests/test_torch_api_compat.py tests/test_microbatch.py tests/test_shapes_contract.py "tests/test_parallel.py::test_buffers_the_forward_updates_are_averaged_over_the_replicas" \
  "tests/test_shared_params.py::test_a_frozen_shared_parameter_stays_frozen"
fi
CUDA_VISIBLE_DEVICES= timeout 420 $PYTHON -m pytest -q -p no:cacheprovider -p no:logging "$@" > $OUT/pytest_torch211.txt 2>&1; echo "pytest rc $?"
tail -6 $OUT/pytest_torch211.txt
timeout 420 $PYTHON -m pytest -q -p no:cacheprovider -p no:logging tests/test_cuda_graphs.py > $OUT/cuda_graphs.txt 2>&1; echo "cuda graphs rc $?"
tail -6 $OUT/cuda_graphs.txt
