"""Import a model made elsewhere into a model folder: a GGUF file (llama.cpp's format, quantized or not) of a Llama,
Qwen2 or Qwen3 model with a byte-level BPE tokenizer. Every tensor is dequantized to float32; the folder holds the
model's own tokenizer, special tokens and chat template, loads in `transformers`, and every command here takes it
(`generate`, `chat`, `serve`, `eval`, `rag`, `export`, and `stage.init_from` to fine-tune it). A Hugging Face
folder needs no import: give its path to any of them."""

from __future__ import annotations

import sys

NAME = "import"
HELP = "import a GGUF file (llama.cpp) into a model folder"


def add_arguments(p) -> None:
    p.add_argument("--gguf", required=True, metavar="FILE", help="the .gguf file")
    p.add_argument("--out", required=True,
                   help="model folder to write: a new or empty folder, or a model folder to overwrite")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="weight dtype on disk (the dequantized weights are float32)")


def run(args) -> int:
    from astrai_ds.convert.gguf import import_gguf

    out = import_gguf(args.gguf, args.out, progress=sys.stderr.isatty(), dtype=args.dtype)
    print(f"imported {args.gguf} to {out}")
    return 0
