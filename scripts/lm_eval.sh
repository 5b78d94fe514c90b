#!/usr/bin/env bash
# Evaluate a model folder with EleutherAI's lm-evaluation-harness through `astrai-ds serve` (docs/lm_eval.md):
# starts the server on a free port, waits until it is healthy, runs `lm_eval --model local-completions` against it,
# and stops the server, also when lm_eval fails or the script is interrupted.
#
#   scripts/lm_eval.sh MODEL_DIR TASKS OUT_DIR [more lm_eval arguments]
#     TASKS: an lm-eval task or group name, or several joined by commas (`astrai` for the four tasks that
#            `astrai-ds corpus` writes into CORPUS/lm_eval; see INCLUDE below)
#
# Environment: INCLUDE (a folder of task files, passed as --include_path; default runs/quickstart/corpus/lm_eval),
# DTYPE (the server's weights: auto, the default, bf16 or fp32), CONCURRENT (requests in flight, default 8: the
# server batches them), SERVE_ARGS (more `astrai-ds serve` options), CHAT_TEMPLATE (1, the default: pass
# --apply_chat_template, which the built-in chat tasks need; 0 for plain-text tasks on a base model).
# Nothing is downloaded: the tokenizer is the model folder's and the data files are local (HF_HUB_OFFLINE=1,
# HF_DATASETS_OFFLINE=1).
source "$(dirname "$0")/env.sh" eval
if [ $# -lt 3 ]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
MODEL=$1 TASKS=$2 OUT=$3
shift 3
INCLUDE="${INCLUDE:-runs/quickstart/corpus/lm_eval}"
[ -d "$MODEL" ] || { echo "lm_eval.sh: no model folder $MODEL (from astrai-ds export or import)" >&2; exit 2; }
[ -d "$INCLUDE" ] || { echo "lm_eval.sh: no task folder $INCLUDE (astrai-ds corpus --out DIR writes DIR/lm_eval)" >&2
                        exit 2; }
CONTEXT=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["max_position_embeddings"])' \
  "$MODEL/config.json")
PORT=$(free_port)
mkdir -p "$OUT"
# shellcheck disable=SC2086
astrai-ds serve --model "$MODEL" --dtype "${DTYPE:-auto}" --port "$PORT" ${SERVE_ARGS:-} \
  > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "lm_eval.sh: the server stopped:" >&2; tail -20 "$OUT/server.log" >&2; exit 1; }
  sleep 1
done
CHAT_FLAG=$([ "${CHAT_TEMPLATE:-1}" = 1 ] && echo --apply_chat_template || true)
echo "== lm_eval $TASKS on $MODEL (served on port $PORT, context $CONTEXT)"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model local-completions \
  --model_args "model=$(basename "$MODEL"),base_url=http://127.0.0.1:$PORT/v1/completions,tokenizer_backend=huggingface,tokenizer=$MODEL,max_length=$CONTEXT,num_concurrent=${CONCURRENT:-8}" \
  --include_path "$INCLUDE" --tasks "$TASKS" ${CHAT_FLAG} --output_path "$OUT" "$@"
