#!/usr/bin/env bash
# GRPO on a real pretrained model, on 2 ranks of the real `deepspeed` launcher (2 CPU processes over gloo on a machine
# without GPUs): SmolLM2-135M-Instruct answers the built-in corpus's questions, its sampled answers are scored, and
# the held-out chat questions (sft_eval.jsonl, none of which it trains on) are asked before and after:
#   SmolLM2-135M-Instruct (GGUF) -> model folder -> chat eval (base)
#   -> GRPO with LoRA (configs/train/grpo_smollm2.json: 40 steps of 4 training questions x 8 sampled answers, rewards
#      `exact` 1.0 and `contains` 0.5) -> export -> chat eval (grpo)
# SmolLM2 answers in sentences ("75 + 87 equals 162."), never with the value first, so `exact` alone would score every
# answer 0 and give GRPO nothing to learn from; `contains` gives credit for the right value anywhere, and the report's
# chat_contains (chat_has) is the number that moves. The table is printed and written to runs/real_grpo/report.json
# ("base" and "grpo"). Everything goes under runs/real_grpo/ (removed first).
#
# Environment: NPROC (ranks, default 2), DTYPE (the evaluation's weights: auto, the default, is bf16 where the CPU
# runs it natively and fp32 elsewhere; or bf16, or fp32).
source "$(dirname "$0")/env.sh"
START=$(date +%s)
R=runs/real_grpo
C=$R/corpus
NPROC="${NPROC:-2}"
DTYPE="${DTYPE:-auto}"
rm -rf "$R"

echo "== SmolLM2-135M-Instruct: fetched once, imported as a model folder (safetensors, tokenizer, chat template)"
GGUF=$(scripts/fetch_smollm2.sh)
astrai-ds import --gguf "$GGUF" --out "$R/models/base"

echo "== built-in corpus: grpo.jsonl (the training questions), sft_eval.jsonl (the held-out ones)"
astrai-ds corpus --out "$C" > /dev/null

# evaluate NAME [RUN]: the held-out chat questions, and the model's entry in the report (its wall time from $T0)
evaluate() {
  local name=$1 run=${2:-}
  echo "== $name: the held-out chat questions ($DTYPE)"
  astrai-ds eval --model "$R/models/$name" --dtype "$DTYPE" --chat "$C/sft_eval.jsonl" \
    --out "$R/eval_chat_$name.json" --responses "$R/responses_chat_$name.jsonl" > /dev/null
  astrai-ds report --stage "$name" ${run:+--run "$run"} --eval "$R/eval_chat_$name.json" --out "$R/report.json" \
    --wall-time $(( $(date +%s) - T0 ))
}

T0=$(date +%s)
evaluate base

echo "== GRPO on $NPROC ranks (ZeRO-2, LoRA), then export"
T0=$(date +%s)
deepspeed --num_gpus "$NPROC" --master_port "$(free_port)" train.py --config configs/train/grpo_smollm2.json \
  --ds_config zero2.json
astrai-ds export --run "$R/grpo" --out "$R/models/grpo"

evaluate grpo "$R/grpo"
echo "real_model_grpo finished in $(( $(date +%s) - START ))s"
