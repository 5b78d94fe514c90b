"""Train a byte-level BPE tokenizer (Chinese and English, NFC text) with <bos> <eos> <pad>, ChatML
<|im_start|> <|im_end|> and reserved special tokens. Reads .txt (a document per line) and .jsonl (field `text`)."""

from __future__ import annotations

NAME = "tokenizer"
HELP = "train a byte-level BPE tokenizer"


def add_arguments(p) -> None:
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help=".txt or .jsonl files")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="output folder (tokenizer.json is written there)")


def run(args) -> int:
    from astrai_ds.data.tokenizer import Tokenizer, train_tokenizer

    path = train_tokenizer(args.input, args.vocab_size, args.out)
    learned = Tokenizer.load(path).vocab_size
    print(f"wrote {path} ({learned} tokens)")
    if learned < args.vocab_size:
        print(f"learned {learned} of the {args.vocab_size} tokens asked for: the input is too small to learn more "
              f"merges (give more text for a larger vocabulary)")
    return 0
