"""Consolidate a training run's DeepSpeed checkpoint (no ZeRO, ZeRO-1/2/3) into a model folder, loadable without
DeepSpeed and by Hugging Face `transformers` (LlamaForCausalLM, Qwen3ForCausalLM with QK-norm, Qwen2ForCausalLM with
q/k/v biases): config.json, model.safetensors, generation_config.json, tokenizer.json and tokenizer_config.json (with
the chat template). With --format gguf, write one GGUF file that llama.cpp runs instead, from a run or from a model
folder (--model). A LoRA run's adapters are folded into the base weights; --adapter writes them alone instead, in
PEFT's layout, naming the base folder the run started from."""

from __future__ import annotations

NAME = "export"
HELP = "export a checkpoint to a model folder (also a Hugging Face Llama folder)"


def add_arguments(p) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="the run folder (output_dir of train.py)")
    source.add_argument("--model", help="a model folder (with --format gguf: convert it)")
    p.add_argument("--tag", default=None, help="checkpoint to export, e.g. global_step200 (default: latest)")
    p.add_argument("--out", required=True,
                   help="model folder to write: a new or empty folder, or a model folder to overwrite; with "
                        "--format gguf, the .gguf file to write")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a model folder (Hugging Face's layout); gguf: one GGUF file for llama.cpp")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weight dtype on disk (hf)")
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA run's adapters alone, in PEFT's layout (adapter_model.safetensors, adapter_config.json "
                        "naming the base folder), instead of the merged model folder")
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"], default="f16",
                   help="weight type of the GGUF file's matrices (norms and biases stay f32)")


def run(args) -> int:
    from pathlib import Path

    from astrai_ds.errors import UserError

    source = args.run or args.model
    if args.format == "hf":
        if args.model:
            raise UserError("--model is for --format gguf; a model folder is already in the hf format")
        from astrai_ds.convert.export import export_adapter, export_run

        if args.adapter:
            out = export_adapter(args.run, args.out, tag=args.tag)
        else:
            out = export_run(args.run, args.out, tag=args.tag, dtype=args.dtype)
    else:
        import torch

        if args.adapter:
            raise UserError("--adapter writes PEFT's layout (--format hf); a GGUF file holds a whole model")

        from astrai_ds.convert.export import run_model
        from astrai_ds.convert.gguf import export_gguf
        from astrai_ds.model.io import load_model_folder

        out = Path(args.out)
        if out.is_dir() or out.suffix != ".gguf":
            raise UserError(f"--out {out}: with --format gguf, give the path of a .gguf file to write")
        model, tokenizer = (run_model(args.run, args.tag) if args.run else
                            load_model_folder(args.model, dtype=torch.float32))
        out = export_gguf(model, tokenizer, out, args.outtype, name=Path(source).name)
    print(f"exported {source} to {out}")
    return 0
