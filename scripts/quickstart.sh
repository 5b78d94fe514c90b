#!/usr/bin/env bash
# The main job on the built-in corpus, from nothing to a measured model, on 2 ranks of the real
# `deepspeed` launcher (2 CPU processes over gloo on a machine without GPUs):
#   corpus -> tokenizer -> token shards -> pretrain (ZeRO-2) -> export -> eval -> report
# Everything goes under runs/quickstart/ (removed first, so every run starts clean).
source "$(dirname "$0")/env.sh"
START=$(date +%s)
R=runs/quickstart
NPROC="${NPROC:-2}"
rm -rf "$R"

echo "== 1/6 built-in corpus"
astrai-ds corpus --out "$R/corpus"
echo "== 2/6 tokenizer"
astrai-ds tokenizer --input "$R/corpus/pretrain.jsonl" --vocab-size 2048 --out "$R/tokenizer"
echo "== 3/6 token shards"
astrai-ds prepare --stage pt --input "$R/corpus/pretrain.jsonl" --tokenizer "$R/tokenizer" --out "$R/data/pt" --seq-len 128
astrai-ds prepare --stage pt --input "$R/corpus/pretrain_eval.jsonl" --tokenizer "$R/tokenizer" --out "$R/data/pt_eval" --seq-len 128
echo "== 4/6 pretraining on $NPROC ranks"
deepspeed --num_gpus "$NPROC" train.py --config configs/train/pt_tiny.json --ds_config zero2.json
echo "== 5/6 export"
astrai-ds export --run "$R/pt" --out "$R/models/pt"
echo "== 6/6 eval"
astrai-ds eval --model "$R/models/pt" --data "$R/corpus/pretrain_eval.jsonl" --out "$R/eval_pt.json" > /dev/null
astrai-ds report --stage pt --run "$R/pt" --eval "$R/eval_pt.json" --out "$R/report.json" --wall-time $(( $(date +%s) - START ))
