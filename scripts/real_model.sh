#!/usr/bin/env bash
# The second main job: a real pretrained model, before and after fine-tuning, on 2 ranks of the real `deepspeed`
# launcher (2 CPU processes over gloo on a machine without GPUs):
#   SmolLM2-135M-Instruct (GGUF) -> model folder -> RAG and chat eval (base)
#   -> SFT on the corpus's reading conversations in SmolLM2's own chat template (ZeRO-2) -> the same eval (tuned)
# The model is fetched once per machine (scripts/fetch_smollm2.sh, ~/.cache/astrai_ds/models). The evaluation runs
# on the held-out articles (documents_eval.jsonl: entities no training file names), English and Chinese apart:
# closed-book, with the top 3 chunks that BM25 retrieves, and with the chunk that states the answer (the oracle);
# and the corpus's held-out chat questions, so that a loss of general ability shows. The table is printed and
# written to runs/real/report.json ("base" and "tuned"). Then lm-evaluation-harness runs the corpus's four tasks
# against `astrai-ds serve` (scripts/lm_eval.sh; results in runs/real/lm_eval_base and lm_eval_tuned). Everything
# goes under runs/real/ (removed first).
#
# Environment: NPROC (ranks, default 2), DTYPE (the evaluation's weights: auto, the default, is bf16 where the CPU
# runs it natively and fp32 elsewhere, where bf16 is emulated and slow; or bf16, or fp32, about 1.6x slower than bf16
# on a CPU with native bf16; the two gave the same scores within 0.025 here), SKIP_LM_EVAL=1 (leave out the lm-eval
# runs, about 5 minutes per model here).
source "$(dirname "$0")/env.sh"
START=$(date +%s)
R=runs/real
C=$R/corpus
NPROC="${NPROC:-2}"
DTYPE="${DTYPE:-auto}"
rm -rf "$R"

echo "== SmolLM2-135M-Instruct: fetched once, imported as a model folder (safetensors, tokenizer, chat template)"
GGUF=$(scripts/fetch_smollm2.sh)
astrai-ds import --gguf "$GGUF" --out "$R/models/base"

echo "== built-in corpus; its reading conversations as SFT rows in SmolLM2's chat template"
astrai-ds corpus --out "$C" > /dev/null
astrai-ds prepare --stage sft --input "$C/reading.jsonl" --tokenizer "$R/models/base" --out "$R/data/reading" \
  --seq-len 512

# evaluate NAME [RUN]: index the held-out articles with the model, RAG and chat eval, the model's entry in the report
# (its wall time counts from $T0)
evaluate() {
  local name=$1 run=${2:-} model=$R/models/$1
  echo "== $name: RAG and chat eval on the held-out articles and questions ($DTYPE)"
  astrai-ds rag index --docs "$C/documents_eval.jsonl" --model "$model" --dtype "$DTYPE" --out "$R/rag_index_$name"
  astrai-ds rag eval --index "$R/rag_index_$name" --docs "$C/documents_eval.jsonl" --model "$model" --dtype "$DTYPE" \
    --mode bm25 --out "$R/eval_rag_$name.json" --responses "$R/responses_rag_$name.jsonl"
  astrai-ds eval --model "$model" --dtype "$DTYPE" --chat "$C/sft_eval.jsonl" --out "$R/eval_chat_$name.json" \
    --responses "$R/responses_chat_$name.jsonl" > /dev/null
  if [ -z "${SKIP_LM_EVAL:-}" ]; then  # the corpus's four lm-eval tasks, through the server (docs/lm_eval.md)
    INCLUDE="$C/lm_eval" DTYPE="$DTYPE" scripts/lm_eval.sh "$model" astrai "$R/lm_eval_$name"
  fi
  astrai-ds report --stage "$name" ${run:+--run "$run"} --eval "$R/eval_rag_$name.json" "$R/eval_chat_$name.json" \
    --out "$R/report.json" --wall-time $(( $(date +%s) - T0 ))
}

T0=$(date +%s)
evaluate base

echo "== fine-tune on $NPROC ranks (ZeRO-2), then export"
T0=$(date +%s)
deepspeed --num_gpus "$NPROC" --master_port "$(free_port)" train.py --config configs/train/sft_smollm2.json \
  --ds_config zero2.json
astrai-ds export --run "$R/sft" --out "$R/models/tuned"

evaluate tuned "$R/sft"
echo "real_model finished in $(( $(date +%s) - START ))s"
