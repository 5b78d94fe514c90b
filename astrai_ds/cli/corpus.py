"""Write the built-in bilingual corpus of verifiable facts (English and Chinese), with held-out eval items.

Files: pretrain.jsonl (field `text`) and pretrain_eval.jsonl (fields `prompt`, `answer`, `text`); the same
facts as chat data: sft.jsonl (field `messages`) and sft_eval.jsonl (`messages`, `answer`, `answers` in the
"plain" and "full" styles, `preferred`), dpo.jsonl (`prompt`, `chosen`, `rejected`) and dpo_eval.jsonl, and
grpo.jsonl (training questions in the form of sft_eval.jsonl, for GRPO's rewards to check) and grpo_eval.jsonl (the
records of sft_eval.jsonl). SFT answers take either style at random; DPO pairs prefer the full style with the correct
value.
documents.jsonl and documents_eval.jsonl hold Markdown articles about fictional entities (`text`, with `qa`:
questions and exact answers), split by entity; sft.jsonl also holds reading-comprehension conversations on the
training articles (retrieved-style chunks, then a question), which reading.jsonl holds alone, and `astrai-ds
rag eval` measures retrieval and grounded answers on the held-out ones; reading_eval.jsonl holds their questions with
the section that answers each. lm_eval/ holds task files for lm-evaluation-harness over the held-out sets (four
tasks and their group `astrai`; docs/lm_eval.md).
Deterministic: the same seed writes the same bytes (the task files hold the output folder's path). Nothing is
downloaded."""

from __future__ import annotations

NAME = "corpus"
HELP = "write the built-in bilingual corpus"


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed for the facts, the held-out split and the order")
    p.add_argument("--scale", type=float, default=1.0, help="corpus size multiplier")


def run(args) -> int:
    from astrai_ds.data.corpus import write_corpus

    summary = write_corpus(args.out, seed=args.seed, scale=args.scale)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0
