"""Tokenize text into memory-mapped token shards with a JSON index, for training.

Stage pt: .txt (a document per line) and .jsonl (field `text`); every document becomes
<bos> tokens <eos> in one flat stream that training cuts into windows of --seq-len tokens."""

from __future__ import annotations

import json

NAME = "prepare"
HELP = "tokenize text into training shards"


def add_arguments(p) -> None:
    p.add_argument("--stage", choices=["pt"], default="pt", help="training stage the data is for")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt or .jsonl files")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or tokenizer.json")
    p.add_argument("--out", required=True, help="output folder for the shards and index.json")
    p.add_argument("--seq-len", type=int, default=2048, help="training sequence length (recorded in the index)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: up to 4)")


def run(args) -> int:
    from astrai_ds.data.prepare import prepare_pretrain

    summary = prepare_pretrain(args.input, args.tokenizer, args.out, args.seq_len, workers=args.workers)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0
