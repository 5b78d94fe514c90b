"""Evaluate a model folder on held-out data: token loss over the texts and exact match of greedy answers
(records with `prompt` and `answer`, such as the built-in pretrain_eval.jsonl). Prints JSON."""

from __future__ import annotations

import json
from pathlib import Path

NAME = "eval"
HELP = "evaluate a model folder"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model folder (from `astrai-ds export`)")
    p.add_argument("--data", required=True, help="eval .jsonl with prompt/answer (or text) fields")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")


def run(args) -> int:
    from astrai_ds.convert.export import load_model_folder
    from astrai_ds.inference.evaluate import evaluate_model, read_eval_records

    model, tokenizer = load_model_folder(args.model)
    result = evaluate_model(model, tokenizer, read_eval_records(args.data), batch_size=args.batch_size)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
