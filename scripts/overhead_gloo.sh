#!/usr/bin/env bash
# Host overhead over gloo on a quiet machine (the GPU machine's 16 cores, GPUs hidden), 2 ranks: pp, torch
# and pp without its CPU abort-wait thread (scripts/noabort_wait.py), tiny GPT, 1F1B, three alternating
# rounds; then Interleaved1F1B and GPipe once each. Usage: OUT=dir scripts/overhead_gloo.sh
# Results: bench/results/20261202-h200x1-cpu-gloo-overhead/
. "$(dirname "$0")/gpu_env.sh"
OUT=${OUT:?set OUT to a directory}
export CUDA_VISIBLE_DEVICES=""
R="$PYTHON -m torch.distributed.run --standalone --nproc-per-node 2"
A="--schedule 1F1B --microbatches 16 --layers 8 --d-model 32 --heads 2 --seq 16 --vocab 64 --mb-size 1 --warmup 5 --steps 40"
for round in 1 2 3; do
  for v in pp torch noabort; do
    if [ $v = noabort ]; then s="scripts/noabort_wait.py scripts/bench.py --impl pp"; else s="scripts/bench.py --impl $v"; fi
    timeout 120 $R $s $A --tag $v-$round --out $OUT/ovh.jsonl 2>&1 | grep -o '"step_time_s": [0-9.]*\|"step_time_min_s": [0-9.]*' | tr '\n' ' ' | sed "s/^/$v $round: /"; echo
  done
done
for sched in Interleaved1F1B GPipe; do for v in pp torch; do
  timeout 120 $R scripts/bench.py --impl $v ${A/1F1B/$sched} --tag $v-$sched --out $OUT/ovh.jsonl 2>&1 | grep -o '"step_time_s": [0-9.]*' | sed "s/^/$v $sched: /"
done; done
