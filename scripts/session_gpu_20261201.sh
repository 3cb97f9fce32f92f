#!/usr/bin/env bash
# The two-GPU measurements still open for issues 16, 17 and 20, one part per device call:
#   scripts/session_gpu_20261201.sh schedules OUT   issue 20: GPT table (eager, compiled, torch), tiny-model
#                                                  overhead, one-GPU reference, schedule auto against by hand
#   REF=scratch/bench scripts/session_gpu_20261201.sh hf OUT
#                                                  issue 16: HF Llama one GPU / traced cost / every schedule,
#                                                  pp.run hf:LlamaForCausalLM, T5 over 2 GPUs
#   scripts/session_gpu_20261201.sh final OUT       a new lease's one-GPU reference, cost-balanced cuts, memory at
#                                                  16 layers x microbatch 8 (one call, ~8 min)
#   scripts/session_gpu_20261201.sh profiles OUT    recorded HF Llama steps, HF Llama with CUDA graphs, profiles of
#                                                  the tiny 1F1B (pp, torch) and of pp.run at pp 2 (one call, ~6 min)
#   scripts/session_gpu_20261201.sh trainer OUT     one GPU: pp.run's step layer by layer (scripts/trainer_cost.py, ~4 min)
#   scripts/session_gpu_20261201.sh phases OUT      one GPU: pp.run's step timed part by part (scripts/trainer_phases.py)
#   scripts/session_gpu_20261201.sh memory OUT      issue 17: checkpointing memory (bf16, activation-dominated),
#                                                  bf16-mixed against bf16, the largest-GPT runs
# REF holds ../shared/bench (hf_llama_bench.py, hf_traced_cost.py) copied into a git-ignored folder.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
PART=${1:?usage: scripts/session_gpu_20261201.sh schedules|hf|memory|final|profiles|trainer|phases OUT}
OUT=${2:?usage: scripts/session_gpu_20261201.sh schedules|hf|memory|final|profiles|trainer|phases OUT}
mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
{ nvidia-smi -L; "$PYTHON" -c "import torch; print('torch', torch.__version__)"; } > "$OUT/device.txt" 2>&1
R="$PYTHON -m torch.distributed.run --standalone --nproc-per-node 2"
R1="$PYTHON -m torch.distributed.run --standalone --nproc-per-node 1"
quiet() { grep -v "^W1\|^I1\|warnings.warn\|FutureWarning" | cut -c1-300; }

gpt_cfg() {  # gpt_cfg FILE SCHEDULE [MICROBATCHES]: pp.run config of issue 20's model (bf16, microbatch 2)
  local mb=${3:+", microbatches: $3"}
  cat > "$1" <<EOY
model: {name: gpt, vocab_size: 32768, d_model: 2048, n_layers: 16, n_heads: 16, seq_len: 1024}
parallel: {pp: 2}
schedule: {name: $2$mb}
train: {steps: 14, batch_size: 32, precision: bf16, log_every: 1}
checkpoint: {every: 0}
EOY
}

case "$PART" in
schedules)
  echo "== one GPU, whole model (16 microbatches of 2, gradient accumulation)"
  timeout 90 $R1 scripts/bench.py --schedule 1F1B --microbatches 16 --warmup 2 --steps 6 --tag single \
      --out "$OUT/results.jsonl" 2>&1 | quiet | tail -2
  cat > "$OUT/suite.json" <<'EOJ'
[{"impl": "pp", "schedule": "1F1B"}, {"impl": "torch", "schedule": "1F1B"},
 {"impl": "torch", "schedule": "DualPipeV"}, {"impl": "pp", "schedule": "DualPipeV"},
 {"impl": "pp", "schedule": "ZBVZeroBubble"}, {"impl": "torch", "schedule": "ZBVZeroBubble"},
 {"impl": "torch", "schedule": "Interleaved1F1B"}, {"impl": "pp", "schedule": "Interleaved1F1B"},
 {"impl": "pp", "schedule": "1F1B", "layers": 8, "d_model": 512, "heads": 8, "seq": 128, "tag": "overhead"},
 {"impl": "torch", "schedule": "1F1B", "layers": 8, "d_model": 512, "heads": 8, "seq": 128, "tag": "overhead"},
 {"impl": "torch", "schedule": "Interleaved1F1B", "layers": 8, "d_model": 512, "heads": 8, "seq": 128, "tag": "overhead"},
 {"impl": "pp", "schedule": "Interleaved1F1B", "layers": 8, "d_model": 512, "heads": 8, "seq": 128, "tag": "overhead"},
 {"impl": "pp", "schedule": "1F1B", "layers": 8, "d_model": 512, "heads": 8, "seq": 128, "tag": "overhead", "cuda_graphs": true},
 {"impl": "pp", "schedule": "Interleaved1F1B", "layers": 8, "d_model": 512, "heads": 8, "seq": 128, "tag": "overhead", "cuda_graphs": true},
 {"impl": "pp", "schedule": "DualPipeV", "compile": true, "compile_per": "stage"},
 {"impl": "pp", "schedule": "1F1B", "compile": true, "compile_per": "stage"},
 {"impl": "torch", "schedule": "1F1B", "compile": true},
 {"impl": "pp", "schedule": "ZBVZeroBubble", "compile": true, "compile_per": "stage"},
 {"impl": "pp", "schedule": "Interleaved1F1B", "compile": true, "compile_per": "stage"},
 {"impl": "torch", "schedule": "Interleaved1F1B", "compile": true},
 {"impl": "pp", "schedule": "DualPipeV", "compile": true, "compile_per": "block"},
 {"impl": "pp", "schedule": "1F1B", "compile": true, "compile_per": "block"},
 {"impl": "pp", "schedule": "DualPipeV", "compile": true, "compile_per": "stage", "cuda_graphs": true}]
EOJ
  echo "== two GPUs: the table (eager, overhead, compiled)"
  timeout ${SUITE_S:-330} $R scripts/bench.py --suite "$OUT/suite.json" --microbatches 16 --warmup 2 --steps 5 \
      --resume --timeout-s 600 --out "$OUT/results.jsonl" 2>&1 | quiet > "$OUT/log.txt"; grep -v "^{" "$OUT/log.txt" | tail -3
  "$PYTHON" scripts/bench_table.py "$OUT/results.jsonl" > "$OUT/table.md" 2>&1
  echo "== schedule auto against schedules by hand (pp.run, bf16, batch 32 x 1024)"
  for s in auto DualPipeV 1F1B; do
    gpt_cfg "$OUT/gpt_$s.yaml" "$s" $([ "$s" = auto ] || echo 16)
    timeout 75 $R -m pp.run "$OUT/gpt_$s.yaml" --output.dir "$OUT/run_$s" 2>&1 | quiet > "$OUT/run_$s.txt"
    tail -3 "$OUT/run_$s.txt"
  done
  "$PYTHON" - "$OUT" <<'EOP' | tee "$OUT/auto.txt"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for s in ("auto", "DualPipeV", "1F1B"):
    p = out / f"run_{s}" / "summary.json"
    if p.exists():
        d = json.loads(p.read_text())
        print(s, "tok/s", round(d.get("tokens_per_s", 0)), "tuned", (d.get("tuned") or {}).get("schedule"),
              (d.get("tuned") or {}).get("microbatches"), "predicted/measured", d.get("predicted_step_s"),
              d.get("measured_step_s"), d.get("step_time_ratio"))
EOP
  ;;
hf)
  REF=${REF:?set REF to the folder with hf_llama_bench.py and hf_traced_cost.py}
  "$PYTHON" -c "import transformers; print('transformers', transformers.__version__)" >> "$OUT/device.txt" 2>&1
  echo "== one GPU, whole model, gradient accumulation"
  timeout 100 "$PYTHON" "$REF/hf_llama_bench.py" --single 2>&1 | tee "$OUT/single.txt" | tail -1
  echo "== one GPU, traced pipe vs eager"
  timeout 100 "$PYTHON" scripts/traced_cost.py --out "$OUT/traced_cost.jsonl" 2>&1 | tail -2
  echo "== two GPUs, pp, schedules (16 microbatches)"
  timeout 240 $R scripts/bench.py --model hf-llama --microbatches 16 --warmup 2 --steps 5 --timeout-s 600 \
      --suite "pp:1F1B:16,pp:DualPipeV:16,pp:ZBVZeroBubble:16,pp:Interleaved1F1B:16,pp:GPipe:16" \
      --out "$OUT/pp.jsonl" 2>&1 | quiet | grep -v "^{" | tail -4
  "$PYTHON" scripts/bench_table.py "$OUT/pp.jsonl" > "$OUT/table.md" 2>&1
  echo "== pp.run hf:LlamaForCausalLM on 2 GPUs"
  timeout 120 $R -m pp.run configs/hf-llama-2gpu.yaml --train.steps 12 --output.dir "$OUT/hf-llama" 2>&1 | quiet \
      > "$OUT/hf_llama_run.txt"; tail -4 "$OUT/hf_llama_run.txt"
  echo "== T5 over 2 GPUs"
  timeout 100 $R scripts/hf_t5_gpu_check.py --steps 3 2>&1 | quiet | tee "$OUT/t5.txt" | tail -3
  ;;
memory)
  M="scripts/bench_memory.py --warmup 1 --steps 3 --fused-adamw"
  echo "== activation-dominated: bf16, 8 layers d4096 seq 4096, microbatch 4"
  timeout 200 $R $M --layers 8 --mb-size 4 --out "$OUT/mem_act.jsonl" --configs \
pp:1F1B:none:bf16:0:2:1,pp:1F1B:full:bf16:0:2:1,pp:1F1B:selective:bf16:0:2:1,torch:1F1B:none:bf16:0:2:1,\
pp:ZBVZeroBubble:none:bf16:0:2:1,pp:ZBVZeroBubble:full:bf16:0:2:1,pp:ZBVZeroBubble:selective:bf16:0:2:1 \
      2>&1 | quiet | tail -3
  echo "== bf16-mixed against bf16 (fused AdamW both)"
  timeout 120 $R $M --out "$OUT/mixed.jsonl" --configs \
pp:1F1B:none:bf16-mixed:0:2:1,pp:1F1B:none:bf16:0:2:1,pp:ZBVZeroBubble:none:bf16-mixed:0:2:1,pp:ZBVZeroBubble:none:bf16:0:2:1 \
      2>&1 | quiet | tail -3
  LG="pp:1F1B:none:bf16-mixed:0:2:1,torch:1F1B:none:bf16-mixed:0:2:1,pp:1F1B:full:bf16-mixed:0:2:1,torch:1F1B:full:bf16-mixed:0:2:1,pp:1F1B:selective:bf16-mixed:0:2:1,pp:1F1B:none:bf16:0:2:1,torch:1F1B:none:bf16:0:2:1,pp:1F1B:full:bf16:0:2:1"
  for L in 4 8; do
    echo "== largest GPT: $L layers, d4096 seq 2048"
    timeout 130 $R $M --layers $L --seq 2048 --out "$OUT/largest_L$L.jsonl" --configs "$LG" 2>&1 | quiet | tail -2
  done
  "$PYTHON" scripts/largest_gpt.py "$OUT/largest_L4.jsonl" "$OUT/largest_L8.jsonl" > "$OUT/largest.md" 2>&1
  cat "$OUT/largest.md"
  ;;
final)  # the same lease's one-GPU reference, cost-balanced cuts, a larger activation-dominated size, HF traces
  timeout 80 $R1 scripts/bench.py --schedule 1F1B --microbatches 16 --warmup 2 --steps 6 --tag single \
      --out "$OUT/results.jsonl" 2>&1 | quiet | tail -1
  cat > "$OUT/suite.json" <<'EOJ'
[{"impl": "pp", "schedule": "Interleaved1F1B", "stages_per_rank": 4, "compile": true, "compile_per": "stage", "split": "cost"},
 {"impl": "pp", "schedule": "DualPipeV", "compile": true, "compile_per": "stage", "split": "cost"},
 {"impl": "pp", "schedule": "Interleaved1F1B", "stages_per_rank": 4},
 {"impl": "torch", "schedule": "Interleaved1F1B", "stages_per_rank": 4},
 {"impl": "pp", "schedule": "Interleaved1F1B", "compile": true, "compile_per": "stage", "split": "cost"},
 {"impl": "torch", "schedule": "1F1B", "compile": true, "split": "cost"},
 {"impl": "pp", "schedule": "1F1B", "compile": true, "compile_per": "stage", "split": "cost"},
 {"impl": "torch", "schedule": "Interleaved1F1B", "split": "cost"},
 {"impl": "pp", "schedule": "Interleaved1F1B", "split": "cost"},
 {"impl": "pp", "schedule": "DualPipeV", "split": "cost"},
 {"impl": "torch", "schedule": "DualPipeV", "split": "cost"},
 {"impl": "pp", "schedule": "ZBVZeroBubble", "compile": true, "compile_per": "stage", "split": "cost"}]
EOJ
  timeout 230 $R scripts/bench.py --suite "$OUT/suite.json" --microbatches 16 --warmup 2 --steps 5 \
      --resume --timeout-s 600 --out "$OUT/results.jsonl" 2>&1 | quiet > "$OUT/log.txt"; grep -v "^{" "$OUT/log.txt" | tail -2
  echo "== activation-dominated, larger: bf16, 16 layers d4096 seq 4096, microbatch 8"
  timeout 260 $R scripts/bench_memory.py --warmup 1 --steps 2 --fused-adamw --layers 16 --mb-size 8 \
      --out "$OUT/mem_act16.jsonl" \
      --configs pp:1F1B:full:bf16:0:2:1,pp:1F1B:none:bf16:0:2:1,pp:1F1B:selective:bf16:0:2:1,torch:1F1B:none:bf16:0:2:1 \
      2>&1 | quiet | tail -2
  ;;
profiles)  # where time goes: recorded steps and torch.profiler traces (tar'd: the device returns few files)
  echo "== HF Llama, one recorded step per schedule"
  mkdir -p /tmp/traces
  timeout 80 $R scripts/bench.py --model hf-llama --suite "pp:DualPipeV:16,pp:1F1B:16" --warmup 2 --steps 3 \
      --trace /tmp/traces --out /tmp/traces/hf.jsonl 2>&1 | quiet | grep -v "^{" | tail -2
  echo "== HF Llama with CUDA-graph replay on 2 GPUs"
  timeout 120 $R scripts/bench.py --model hf-llama --microbatches 16 --warmup 2 --steps 5 --cuda-graphs \
      --suite "pp:1F1B:16,pp:ZBVZeroBubble:16,pp:DualPipeV:16" --out "$OUT/hf_graphs.jsonl" 2>&1 | quiet | grep -v "^{" | tail -2
  echo "== tiny model 1F1B, one profiled step per rank, pp and torch (host overhead over NCCL), each twice in"
  echo "   the order pp torch torch pp (in the 12-01 suite the first tiny configuration ran slower, whichever it was)"
  i=0
  for impl in pp torch torch pp; do
    i=$((i + 1)); mkdir -p /tmp/traces/prof_${impl}_$i
    timeout 60 $R scripts/bench.py --impl $impl --schedule 1F1B --microbatches 16 --layers 8 --d-model 512 --heads 8 \
        --seq 128 --tag overhead-$i --warmup 3 --steps 10 --profile /tmp/traces/prof_${impl}_$i --out "$OUT/overhead.jsonl" \
        2>&1 | quiet | grep -v "^{" | tail -1
  done
  echo "== pp.run at pp 2, 1F1B 16 microbatches, step 5 profiled (pp.run ran 125k tok/s against bench.py's 149k)"
  gpt_cfg /tmp/gpt_1f1b.yaml 1F1B 16
  timeout 120 $R -m pp.run /tmp/gpt_1f1b.yaml --output.profile_step 5 --output.dir /tmp/traces/run_1f1b 2>&1 | quiet \
      | grep "done:\|rank [01]:" | tee "$OUT/run_1f1b.txt"
  tar czf "$OUT/traces.tgz" -C /tmp traces
  ;;
trainer)  # one GPU is enough: which layer of pp.run's step adds host time (bench/results/20261201-h200x1-trainer)
  timeout 400 $R1 scripts/trainer_cost.py --rounds 6 --out "$OUT/trainer_cost.jsonl" 2>&1 | quiet | tail -1
  ;;
phases)  # one GPU: pp.run at pp 1 on issue 20's GPT with each part of its step timed on the host
  gpt_cfg "$OUT/gpt_pp1.yaml" 1F1B 16; sed -i 's/pp: 2/pp: 1/' "$OUT/gpt_pp1.yaml"
  timeout 200 $R1 scripts/trainer_phases.py "$OUT/phases.jsonl" "$OUT/gpt_pp1.yaml" --output.dir /tmp/run_phases \
      2>&1 | quiet | grep "tokens/s" | tail -1
  ;;
*) echo "unknown part $PART (schedules, hf, memory, final, profiles, trainer, phases)"; exit 2;;
esac
