# One GPU: pp.run trains a small Mixtral with output_router_logits under bf16-mixed (the MoE load-balancing loss path on CUDA).
. scripts/gpu_env.sh
$PYTHON -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)" || exit 0
mkdir -p $OUT/moe
cat > $OUT/moe/cfg.yaml <<EOY
model: {name: hf:MixtralForCausalLM, config: {vocab_size: 256, hidden_size: 256, intermediate_size: 512, num_hidden_layers: 4, num_attention_heads: 8, num_key_value_heads: 4, num_local_experts: 8, num_experts_per_tok: 2, max_position_embeddings: 256, output_router_logits: true, router_aux_loss_coef: 0.02}}
parallel: {pp: 1}
schedule: {name: 1F1B, microbatches: 4}
train: {steps: 30, batch_size: 16, lr: 3.0e-3, precision: bf16-mixed, log_every: 10}
eval: {every: 30, steps: 2}
checkpoint: {every: 0}
output: {dir: $OUT/moe/run}
EOY
timeout 200 $PYTHON -m torch.distributed.run --standalone --nproc-per-node 1 -m pp.run $OUT/moe/cfg.yaml 2>&1 | grep -v "^W1\|warn" | tail -12
