"""Consolidate a training run's DeepSpeed checkpoint (no ZeRO, ZeRO-1/2/3) into a model folder, loadable without
DeepSpeed and by Hugging Face `transformers` (LlamaForCausalLM, or Qwen3ForCausalLM with QK-norm): config.json,
model.safetensors, generation_config.json, tokenizer.json and tokenizer_config.json (with the ChatML template)."""

from __future__ import annotations

NAME = "export"
HELP = "export a checkpoint to a model folder (also a Hugging Face Llama folder)"


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="the run folder (output_dir of train.py)")
    p.add_argument("--tag", default=None, help="checkpoint to export, e.g. global_step200 (default: latest)")
    p.add_argument("--out", required=True,
                   help="model folder to write: a new or empty folder, or a model folder to overwrite")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weight dtype on disk")


def run(args) -> int:
    from astrai_ds.convert.export import export_run

    out = export_run(args.run, args.out, tag=args.tag, dtype=args.dtype)
    print(f"exported {args.run} to {out}")
    return 0
