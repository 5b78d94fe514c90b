#!/usr/bin/env python
"""How much a GRPO reward can move a model on chat questions: its greedy answers against --samples sampled
answers a question, per task.

For each question of a chat JSONL (`sft_eval.jsonl`, `grpo.jsonl`: records with `messages` and `answers`, as
`astrai-ds corpus` writes them), in the model's own chat template, through the generation engine:

  greedy        the share of questions whose greedy answer has the right value (chat_exact_match, as
                `astrai-ds eval --chat` scores it, with --max-new-tokens tokens at most)
  T mean        the share of sampled answers at temperature T with the right value (the mean reward `exact`
                would give a rollout at that temperature)
  T pass@k      the share of questions with at least one right value among the k samples
  T equal       the share of questions whose k samples are all right or all wrong: their group's `exact`
                advantages are all zero, so they give GRPO nothing to learn from
  greedy has    the share of greedy answers, and of answers sampled at temperature T, that hold the record's
  T has         answer anywhere (chat_contains; the mean reward `contains` would give): for a model that answers
                in sentences, whose value is rarely first

A reward can only raise what sampling reaches: where pass@k is far above greedy there is something to sharpen,
where a group's k samples are all wrong (or all right) its advantages are zero. Each sample has its own seed,
so a run repeats. Scored per task (the records' "task") and over all.

    scripts/quickstart.sh      # for runs/quickstart/models/dpo and runs/quickstart/corpus/*.jsonl
    .venv/bin/python benchmarks/reward_headroom.py --model runs/quickstart/models/dpo \\
        --data runs/quickstart/corpus/sft_eval.jsonl --temperatures 0.5,1.0
    .venv/bin/python benchmarks/reward_headroom.py --model runs/quickstart/models/dpo \\
        --data runs/quickstart/corpus/grpo.jsonl --every 6 --json /tmp/headroom.json
    scripts/real_model_grpo.sh # for SmolLM2 in runs/real_grpo/models/base
    .venv/bin/python benchmarks/reward_headroom.py --model runs/real_grpo/models/base \\
        --data runs/real_grpo/corpus/sft_eval.jsonl --every 4 --temperatures 0.7,1.0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None) -> argparse.Namespace:
    from machine import arg_parser

    p = arg_parser(__doc__)
    p.add_argument("--model", required=True, help="model folder")
    p.add_argument("--data", required=True, help="chat JSONL with messages and answers (sft_eval.jsonl, grpo.jsonl)")
    p.add_argument("--samples", type=int, default=8, help="sampled answers per question (k; default: 8)")
    p.add_argument("--temperatures", default="1.0", help="comma-separated sampling temperatures (default: 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per answer at most (default: 32)")
    p.add_argument("--every", type=int, default=1, help="score every Nth question only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples (default: 0)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def answers(engine, prompts: list[list[int]], params: list) -> list[str]:
    completions = engine.generate_batch(prompts, params)
    refused = next((c.error for c in completions if c.error), None)
    if refused:
        raise SystemExit(f"reward_headroom: a request was refused: {refused}")
    return [c.text for c in completions]


def main(argv=None) -> None:
    from astrai_ds.errors import UserError

    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:  # a wrong path or record: one line, as the CLI says it
        raise SystemExit(f"reward_headroom: {e}") from None


def run(args: argparse.Namespace) -> None:
    import torch

    from machine import announce

    from astrai_ds.data.chat import render_chat
    from astrai_ds.data.prompts import prompt_messages
    from astrai_ds.inference.engine import EngineConfig, LLMEngine
    from astrai_ds.inference.evaluate import evaluate_chat, read_eval_records
    from astrai_ds.inference.sampling import SamplingParams
    from astrai_ds.inference.scoring import chat_answer_correct, chat_contains
    from astrai_ds.model.io import load_model_folder

    info = announce()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    model, tokenizer = load_model_folder(args.model)
    records = read_eval_records(args.data, "chat", "--data")[::args.every]
    prompts = [render_chat(tokenizer, prompt_messages(r), add_generation_prompt=True)[0] for r in records]
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=64))
    k = args.samples

    greedy = []  # astrai-ds eval --chat's own greedy answers and scoring, one entry per record
    evaluate_chat(model, tokenizer, records, max_new_tokens=args.max_new_tokens, responses=greedy)
    scores = {"greedy": [float(r["correct"]) for r in greedy], "greedy has": [float(r["contains"]) for r in greedy]}
    for t in temperatures:
        params = [SamplingParams(temperature=t, max_new_tokens=args.max_new_tokens, seed=args.seed + k * i + j)
                  for i in range(len(prompts)) for j in range(k)]
        texts = answers(engine, [p for p in prompts for _ in range(k)], params)
        right = [[chat_answer_correct(texts[k * i + j], r) for j in range(k)] for i, r in enumerate(records)]
        has = [[chat_contains(texts[k * i + j], r) for j in range(k)] for i, r in enumerate(records)]
        scores[f"T {t:g} mean"] = [sum(row) / k for row in right]
        scores[f"T {t:g} pass@{k}"] = [float(any(row)) for row in right]
        scores[f"T {t:g} equal"] = [float(len(set(row)) == 1) for row in right]
        scores[f"T {t:g} has"] = [sum(row) / k for row in has]

    by_task = defaultdict(list)
    for i, r in enumerate(records):
        by_task[str(r.get("task", "all"))].append(i)
    rows = {task: {name: sum(v[i] for i in ids) / len(ids) for name, v in scores.items()} | {"n": len(ids)}
            for task, ids in sorted(by_task.items())}
    if len(by_task) > 1:
        rows["ALL"] = {name: sum(v) / len(v) for name, v in scores.items()} | {"n": len(records)}

    print(f"\nmodel {args.model}, {len(records)} questions of {args.data}, {k} samples each, up to "
          f"{args.max_new_tokens} new tokens, torch {torch.__version__}")
    names = list(scores)
    print(f"{'task':<14}{'n':>5}" + "".join(f"{n:>15}" for n in names))
    for task, row in rows.items():
        print(f"{task:<14}{row['n']:>5}" + "".join(f"{row[n]:>15.3f}" for n in names))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "model": args.model, "data": args.data, "samples": k,
                                         "temperatures": temperatures, "max_new_tokens": args.max_new_tokens,
                                         "every": args.every, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
