#!/usr/bin/env bash
# One GPU (torch 2.11 there): train/eval-mode graphs and strided stage outputs on CUDA (scripts/gpu_mode_check.py),
# then the torch-compat, mode, stride, microbatch and shape tests on that torch (gloo, CPU).
#   OUT=dir bash scripts/gpu_mode_checks.sh
set -u
OUT=${OUT:?set OUT to an output directory}; mkdir -p "$OUT"
. scripts/gpu_env.sh
python -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
$PYTHON -m torch.distributed.run --nproc-per-node 1 --master-port 29611 scripts/gpu_mode_check.py > $OUT/mode_check.txt 2>&1; echo "mode check rc $?"
tail -4 $OUT/mode_check.txt
CUDA_VISIBLE_DEVICES= timeout 480 $PYTHON -m pytest -q -p no:cacheprovider -p no:logging tests/test_torch_signatures.py tests/test_train_eval_mode.py tests/test_strided_outputs.py tests/test_microbatch.py tests/test_shapes_contract.py tests/test_torch_api_compat.py > $OUT/pytest_torch211.txt 2>&1; echo "pytest rc $?"
tail -15 $OUT/pytest_torch211.txt
