"""Tokenize text into memory-mapped token shards with a JSON index, for training.

Stage pt: .txt (a document per line) and .jsonl (field `text`); every document becomes
<bos> tokens <eos> in one flat stream that training cuts into windows of --seq-len tokens."""

from __future__ import annotations

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

    s = prepare_pretrain(args.input, args.tokenizer, args.out, args.seq_len, workers=args.workers)
    print(f"wrote {s['num_documents']} documents, {s['num_tokens']} tokens ({s['dtype']}, {s['num_shards']} shard(s), "
          f"{s['num_samples']} samples of {args.seq_len}) to {s['out_dir']} in {s['seconds']:.1f}s")
    for reason, count in s["skipped"].items():
        print(f"skipped {count} records: {reason} (e.g. {', '.join(s['skipped_examples'].get(reason, [])[:3])})")
    for warning in s["warnings"]:
        print(f"warning: {warning}")
    return 0
