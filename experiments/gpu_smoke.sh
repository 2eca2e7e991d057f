#!/usr/bin/env bash
# Check every GPU path of the framework on one GPU in about 6 minutes, and print what it measured:
#   1-3. stage 3 (tiny Llama SFT + beam-search validation/test + export) on the synthetic default: single GPU
#        bf16-mixed, DeepSpeed ZeRO-2, DeepSpeed ZeRO-3 (the export gathers the shards);
#   4.   the decoding benchmark (512 Games histories, batch 16, 20 beams, bf16);
#   5.   SFT throughput: the tiny CPU-run Llama at fp32 vs bf16-mixed, and a 1.1B-parameter Llama shape
#        (random weights, LoRA + gradient checkpointing, bf16-mixed) with length grouping off vs on;
#   6-7. stage 1 (DCCF) and stage 2 (codebook) on the synthetic default, bf16-mixed.
# Stage 3 reads artifacts/synthetic/codebook: run configs/synthetic/{dccf,codebook}.yaml once before.
# Needs ../shared (data + Llama-2 tokenizer). One log per step in $LOG_DIR (default runs/gpu_smoke); exits 1 if
# any step failed. TRAINER_CONFIG=configs/trainer/cpu.yaml SKIP="zero2 zero3" runs the rest on a CPU, slowly.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${LOG_DIR:-runs/gpu_smoke}
TRAINER_CONFIG=${TRAINER_CONFIG:-configs/trainer/gpu.yaml}
SKIP=${SKIP:-}
DEVICE=$([ "$TRAINER_CONFIG" = configs/trainer/cpu.yaml ] && echo cpu || echo cuda)
mkdir -p "$LOG_DIR"
failed=()

step() {  # step <name> <time limit, s> <command...>
  local name=$1 limit=$2 begin=$SECONDS rc
  shift 2
  if [[ " $SKIP " == *" $name "* ]]; then echo "=== $name: skipped"; return; fi
  echo "=== $name"
  timeout "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
  rc=$?
  grep -aE "(val|test)/(hr|ndcg)@10|BENCH_SFT|^variant|x first|^\(config\)|^--|ratio|users/s|exported|trainable of" \
    "$LOG_DIR/$name.log" | grep -v "^BENCH_SFT" | tail -n 20
  echo "=== $name: exit $rc after $((SECONDS - begin)) s"
  if [ "$rc" -ne 0 ]; then
    failed+=("$name")
    tail -n 25 "$LOG_DIR/$name.log"
  fi
}

# one epoch (capped) of the synthetic Alignment Tasks, then beam-search validation/test and the export
llm=(lightning fit --config configs/synthetic/llm.yaml --config "$TRAINER_CONFIG" --trainer.max_epochs 1
  --trainer.limit_train_batches 100)

python - <<'PY'
import torch, lightning, transformers, peft
print("torch", torch.__version__, "| lightning", lightning.__version__, "| transformers", transformers.__version__,
      "| peft", peft.__version__, "| cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY

step llm_single 120 "${llm[@]}" --trainer.default_root_dir runs/gpu_smoke/llm_single
step zero2 120 "${llm[@]}" --config configs/strategy/deepspeed_zero2.yaml --trainer.devices 1 \
  --trainer.default_root_dir runs/gpu_smoke/zero2
step zero3 120 "${llm[@]}" --config configs/strategy/deepspeed_zero3.yaml --trainer.devices 1 \
  --trainer.default_root_dir runs/gpu_smoke/zero3

step decoding 150 python experiments/bench_decoding.py --device "$DEVICE" --dtype bfloat16 \
  --num-histories 512 --batch1-histories 64

tiny='{"hidden_size":64,"intermediate_size":171,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":4,"max_position_embeddings":1024,"tie_word_embeddings":true}'
llama_1b='{"hidden_size":2048,"intermediate_size":5632,"num_hidden_layers":22,"num_attention_heads":32,"num_key_value_heads":4,"max_position_embeddings":2048,"tie_word_embeddings":false}'
from_config=(--set=--model.init_args.model_path=null --set=--model.init_args.tokenizer_path=../shared/tokenizers/llama2)
step sft_tiny 90 python experiments/bench_sft.py --config configs/industrial/llm.yaml --config "$TRAINER_CONFIG" \
  "${from_config[@]}" "--set=--model.init_args.llama_config=$tiny" --warmup 5 --steps 40 \
  --variant=--trainer.precision=32-true --variant=--trainer.precision=bf16-mixed
step sft_1b 150 python experiments/bench_sft.py --config configs/industrial/llm.yaml --config "$TRAINER_CONFIG" \
  "${from_config[@]}" "--set=--model.init_args.llama_config=$llama_1b" --set=--model.init_args.lora=true \
  --set=--model.init_args.full_finetune=false --set=--model.init_args.code_softmax=vocabulary \
  --set=--model.init_args.gradient_checkpointing=true --set=--data.init_args.batch_size=16 --warmup 3 --steps 20 --profile 3 \
  --variant=--data.init_args.group_by_length=false --variant=--data.init_args.group_by_length=true

step dccf 90 lightning fit --config configs/synthetic/dccf.yaml --config "$TRAINER_CONFIG" \
  --trainer.max_epochs 5 --trainer.default_root_dir runs/gpu_smoke/dccf
step codebook 90 lightning fit --config configs/synthetic/codebook.yaml --config "$TRAINER_CONFIG" \
  --trainer.max_epochs 5 --trainer.default_root_dir runs/gpu_smoke/codebook

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]} (logs in $LOG_DIR)"
  exit 1
fi
echo "all GPU smoke steps passed (logs in $LOG_DIR)"
