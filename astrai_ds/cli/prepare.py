"""Tokenize text into memory-mapped token shards with a JSON index, for training.

Stage pt: .txt (a document per line) and .jsonl (field `text`); every document becomes
<bos> tokens <eos> in one flat stream that training cuts into windows of --seq-len tokens.

Stage sft: .jsonl conversations, {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
or {"prompt": ..., "response": ...} (optionally "system"), rendered with the ChatML template; the loss
mask covers the assistant turns only. Stage dpo: .jsonl pairs, {"prompt": text or messages, "chosen": ...,
"rejected": ...}. Bad records are skipped and counted by reason, with examples (file:line)."""

from __future__ import annotations

NAME = "prepare"
HELP = "tokenize text into training shards"


def add_arguments(p) -> None:
    p.add_argument("--stage", choices=["pt", "sft", "dpo"], default="pt", help="training stage the data is for")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".txt or .jsonl files (pt), .jsonl files (sft, dpo)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or tokenizer.json")
    p.add_argument("--out", required=True, help="output folder for the shards and index.json")
    p.add_argument("--seq-len", type=int, default=2048,
                   help="training sequence length (recorded in the index; dpo skips pairs that do not fit)")
    p.add_argument("--workers", type=int, default=None, help="encoding processes (default: up to 4)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the prepared data already in --out (otherwise such a folder is refused)")


def run(args) -> int:
    from astrai_ds.data.prepare import prepare_dpo, prepare_pretrain, prepare_sft

    prepare = {"pt": prepare_pretrain, "sft": prepare_sft, "dpo": prepare_dpo}[args.stage]
    s = prepare(args.input, args.tokenizer, args.out, args.seq_len, workers=args.workers, overwrite=args.overwrite)
    shape = f"{s['num_tokens']} tokens ({s['dtype']}, {s['num_shards']} shard(s)"
    if args.stage == "pt":
        print(f"wrote {s['num_documents']} documents, {shape}, {s['num_samples']} samples of {args.seq_len}) "
              f"to {s['out_dir']} in {s['seconds']:.1f}s")
    else:
        what = (f"{s['num_conversations']} conversations" if args.stage == "sft"
                else f"{s['num_pairs']} pairs ({s['num_documents']} documents)")
        print(f"wrote {what}, {shape}, {s['num_trained_tokens']} trained tokens) to {s['out_dir']} "
              f"in {s['seconds']:.1f}s")
    for reason, count in s["skipped"].items():
        why = s.get("skip_reasons", {}).get(reason)  # sft and dpo explain their reasons
        print(f"skipped {count} records: {reason}{f': {why}' if why else ''} "
              f"(e.g. {', '.join(s['skipped_examples'].get(reason, [])[:3])})")
    for warning in s["warnings"]:
        print(f"warning: {warning}")
    return 0
