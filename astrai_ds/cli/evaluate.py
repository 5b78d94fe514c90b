"""Evaluate a model folder on held-out data: token loss over the texts and exact match of greedy answers
(records with `prompt` and `answer`, such as the built-in pretrain_eval.jsonl). Prints JSON."""

from __future__ import annotations

import json
from pathlib import Path

NAME = "eval"
HELP = "evaluate a model folder"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="model folder (from `astrai-ds export`)")
    p.add_argument("--data", default=None, help="eval .jsonl with prompt/answer (or text) fields: loss and exact match")
    p.add_argument("--chat", default=None, help="chat eval .jsonl (messages, answers, preferred): chat exact match "
                                                 "and preferred-style rate of greedy answers")
    p.add_argument("--pairs", default=None, help="preference pairs .jsonl (prompt, chosen, rejected): how often the "
                                                  "chosen response gets the higher log-prob")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="weights and activations while evaluating; auto: bf16 where the device runs it natively")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--responses", default=None, metavar="OUT.jsonl",
                   help="with --chat: write every greedy answer (question, response, correct, style) to this file")


def run(args) -> int:
    from astrai_ds.convert.export import load_model_folder
    from astrai_ds.errors import UserError
    from astrai_ds.inference.evaluate import evaluate_chat, evaluate_model, evaluate_pairs, read_eval_records

    if not (args.data or args.chat or args.pairs):
        raise UserError("nothing to evaluate: give --data, --chat and/or --pairs")
    if args.responses and not args.chat:
        raise UserError("--responses writes the answers to the --chat questions: give --chat too")
    import torch

    from astrai_ds.training.distributed import bf16_supported

    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and bf16_supported())
    model, tokenizer = load_model_folder(args.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    result = {}
    if args.data:
        result.update(evaluate_model(model, tokenizer, read_eval_records(args.data), batch_size=args.batch_size))
    responses = [] if args.responses else None
    if args.chat:
        result.update(evaluate_chat(model, tokenizer, read_eval_records(args.chat), batch_size=args.batch_size,
                                    responses=responses))
    if args.pairs:
        result.update(evaluate_pairs(model, tokenizer, read_eval_records(args.pairs)))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if responses is not None:
        Path(args.responses).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in responses))
    return 0
