"""Evaluate a model folder on held-out data: token loss over the texts and exact match of greedy answers
(--data: records with `prompt` and `answer`, such as the built-in pretrain_eval.jsonl), greedy chat answers
(--chat: sft_eval.jsonl) and preference pairs (--pairs: dpo_eval.jsonl). Every record is checked before the
model is loaded. Prints JSON on stdout and progress on stderr."""

from __future__ import annotations

import json
from pathlib import Path

from astrai_ds.errors import UserError

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
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="cap on each greedy answer of --data and --chat (default: the longest accepted answer's tokens "
                        "+ 4); give lm-eval's max_gen_toks to compare with its generation tasks")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="weights and activations while evaluating; auto: bf16 where the device runs it natively")
    from astrai_ds.cli.model_commands import add_compile_argument

    add_compile_argument(p)
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--responses", default=None, metavar="OUT.jsonl",
                   help="with --chat: write every greedy answer (question, response, correct, style) to this file")


def _output_file(path: str | None, option: str) -> Path | None:
    """`path` as a file to write at the end, its folder made now: a bad path fails before the evaluation."""
    if path is None:
        return None
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{option} {out}: cannot create its folder {out.parent} ({e.strerror}); give another path") \
            from None
    if out.is_dir():
        raise UserError(f"{option} {out} is a folder; give a file path")
    return out


def run(args) -> int:
    if not (args.data or args.chat or args.pairs):
        raise UserError("nothing to evaluate: give --data, --chat and/or --pairs")
    if args.responses and not args.chat:
        raise UserError("--responses writes the answers to the --chat questions: give --chat too")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    out, responses_out = _output_file(args.out, "--out"), _output_file(args.responses, "--responses")
    from astrai_ds.inference.evaluate import evaluate_chat, evaluate_model, evaluate_pairs, read_eval_records
    from astrai_ds.model.io import load_model_folder

    # Every record is checked before the model is loaded: a wrong file fails in a second, not after an hour.
    facts = read_eval_records(args.data, "facts") if args.data else None
    chat = read_eval_records(args.chat, "chat") if args.chat else None
    pairs = read_eval_records(args.pairs, "pairs") if args.pairs else None
    from astrai_ds.cli.model_commands import compile_decode, model_dtype

    model, tokenizer = load_model_folder(args.model, dtype=model_dtype(args.dtype))
    compile = compile_decode(args)
    result = {}
    if facts:
        result.update(evaluate_model(model, tokenizer, facts, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, progress=True, compile=compile))
    responses = [] if responses_out else None
    if chat:
        result.update(evaluate_chat(model, tokenizer, chat, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens, responses=responses, progress=True,
                                    compile=compile))
    if pairs:
        result.update(evaluate_pairs(model, tokenizer, pairs, progress=True))
    text = json.dumps(result, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")
    if responses_out is not None:
        responses_out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in responses))
    return 0
