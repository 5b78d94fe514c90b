"""Will it fit? Memory per GPU for a model on a cluster, before launching: parameters, model states (weights,
gradients, optimizer) for ZeRO-0/1/2/3 with and without CPU or NVMe offload, per GPU, per node's host memory
and per node's NVMe drives, and
activations per micro-batch with and without activation checkpointing; then which options fit the GPU.

Model states follow DeepSpeed's own estimators (bf16 mixed precision with Adam); activations count what this
model's blocks keep for the backward pass (see astrai_ds/training/memory.py). A tenth of the GPU memory is kept
back for the CUDA context, communication buffers and fragmentation. The option the DeepSpeed config asks for
is marked (examples: docs/scale.md). With LoRA (`--lora-r`, or the train config's `lora` section) the model states
are a LoRA run's: the frozen base's weights, the adapters' weights and gradients, and their optimizer states.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys

from astrai_ds.errors import UserError

NAME = "plan"
HELP = "memory per GPU for a model, ZeRO stage, cluster and batch, before launching"

UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4, "kb": 1000,
         "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4}


def memory_size(text: str, flag: str = "--gpu-memory", examples: str = "80GiB, 24GB or 40960MiB") -> int:
    """'80GiB', '24 GB', '1024' (bytes) -> bytes: KiB/MiB/GiB/TiB are powers of 1024, kB/MB/GB/TB of 1000. `serve
    --kv-budget` reads its sizes with it too."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in UNITS or float(match.group(1)) <= 0:
        raise UserError(f"{flag} {text!r} is not a size: write it like {examples}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model config (JSON); default: the train config's")
    p.add_argument("--config", default=None,
                   help="train config: its model, micro_batch_size, data.seq_len and activation_checkpointing "
                        "are the defaults of the options below")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default=None,
                   help="DeepSpeed config: the ZeRO stage and offload it asks for are marked")
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per forward (default: the "
                                                                 "train config's micro_batch_size, else 1)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the train config's data.seq_len, else the model's max_seq_len)")
    ckpt = p.add_mutually_exclusive_group()
    ckpt.add_argument("--activation-checkpointing", dest="checkpointing", action="store_true", default=None,
                      help="recompute block activations in backward (default: the train config's setting, else off)")
    ckpt.add_argument("--no-activation-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB, 40GB")
    p.add_argument("--lora-r", type=int, default=None,
                   help="plan a LoRA run with adapters of this rank (default: the train config's lora.r, else 0: "
                        "every weight trains)")
    p.add_argument("--lora-target", nargs="+", default=None, metavar="LAYER",
                   help="the linear layers LoRA adapts, as lora.target names them: wq wk wv wo w1 w2 w3, or "
                        "'re:PATTERN' over the dotted names (default: the train config's lora.target, else all seven)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help='the vocabulary size when the model config says "auto"')
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes) instead of a table")


def _inputs(args):
    from astrai_ds.config.base import find_file
    from astrai_ds.config.model import ModelConfig
    from astrai_ds.config.train import TrainConfig

    train = TrainConfig.load(find_file(args.config, "train config")) if args.config else None
    model_path = args.model or (train.model if train else None)
    if not model_path:
        raise UserError("give --model (a model config) or --config (a train config that names one)")
    model_path = find_file(model_path, "model config", key="--model")
    cfg = ModelConfig.load(model_path)
    if cfg.vocab_size == "auto":
        if args.vocab_size is None:
            raise UserError(f'{model_path}: vocab_size is "auto" (the tokenizer\'s size); give --vocab-size N')
        cfg = cfg.resolved(args.vocab_size)
    for key in ("nodes", "gpus_per_node", "micro_batch", "seq_len"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    micro = args.micro_batch or (train.micro_batch_size if train else 1)
    seq_len = args.seq_len or (train.data.seq_len if train else cfg.max_seq_len)
    if seq_len > cfg.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is above the model's max_seq_len {cfg.max_seq_len} ({model_path})")
    checkpointing = args.checkpointing if args.checkpointing is not None else bool(
        train and train.activation_checkpointing)
    return cfg, model_path, micro, seq_len, checkpointing, _lora(args, train, cfg), train.fused_loss if train else True


def _lora(args, train, cfg):
    """The LoRA run to plan: the flags over the train config's lora section; None without LoRA."""
    from astrai_ds.config.base import FieldError
    from astrai_ds.config.train import LoraConfig
    from astrai_ds.errors import ConfigError
    from astrai_ds.training.memory import lora_counts

    base = train.lora if train else LoraConfig()
    r = args.lora_r if args.lora_r is not None else base.r
    try:
        lora = LoraConfig(r=r, alpha=base.alpha, dropout=base.dropout, target=args.lora_target or base.target)
    except FieldError as e:  # the config's own values were checked when it loaded: a flag is wrong
        raise UserError(f"--lora-{e.key} {e.problem}") from None
    if not lora.enabled:
        if args.lora_target:
            raise UserError("--lora-target needs --lora-r N: LoRA is off (r 0)")
        return None
    try:
        return lora_counts(cfg, lora)
    except ConfigError as e:  # a target that matches no layer
        raise UserError(str(e).replace("lora.target", "--lora-target", 1) if args.lora_target
                        else f"{args.config}: {e}") from None


def _gib(n: int) -> str:
    return f"{n / 1024 ** 3:.1f}"


def _mib(n: int) -> str:
    return f"{n / 1024 ** 2:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else str(n)


def _deepspeed_logs_to_stderr() -> None:
    """DeepSpeed's logger writes to the stdout of its first import, and that import logs its accelerator warning:
    imported here with stdout pointing at stderr, it leaves stdout to the JSON (`plan --json | jq`)."""
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed.utils.logging  # noqa: F401


def run(args) -> int:
    if args.json:
        _deepspeed_logs_to_stderr()
    from astrai_ds.config.deepspeed import load_ds_config, zero_stage
    from astrai_ds.training.memory import asked_option, plan

    cfg, model_path, micro, seq_len, checkpointing, lora, fused = _inputs(args)
    result = plan(cfg, args.gpus_per_node, args.nodes, micro, seq_len, memory_size(args.gpu_memory), checkpointing,
                  lora=lora, fused=fused)
    ds = load_ds_config(args.ds_config)[0] if args.ds_config else None
    asked = asked_option(result["options"], ds) if ds is not None else None
    for row in result["options"]:
        row["asked"] = row is asked
    if args.json:
        print(json.dumps({"model": str(model_path), **result}, indent=2))
        return 0
    p, act = result["params"], result["activations"]
    print(f"model {model_path}: {_count(p['total'])} parameters ({_count(p['embedding'])} in embeddings), largest "
          f"layer {_count(p['largest_layer'])}")
    print(f"{args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {result['gpus']} GPU(s) of "
          f"{_gib(result['gpu_memory'])} GiB ({_gib(result['usable_gpu_memory'])} usable); micro-batch {micro} x "
          f"{seq_len} tokens, bf16")
    if lora is not None:
        print(f"LoRA r {lora.r} on {', '.join(lora.target)}: {_count(lora.adapter)} adapter parameters trained "
              f"({len(lora.layers)} layers), {_count(p['total'])} frozen")
    print(f"activations per GPU: {_gib(act['blocks'] + act['logits'])} GiB without activation checkpointing, "
          f"{_gib(act['blocks_checkpointed'] + act['logits'])} GiB with (the loss's head {_gib(act['logits'])} GiB "
          f"in both, {'in chunks' if fused else 'the whole logits'}: fused_loss {str(fused).lower()}); below: "
          f"{'with' if checkpointing else 'without'}\n")
    # LoRA splits the model states into the frozen base, the adapters (weights, gradients) and their optimizer
    # states; the adapters' two are small enough to count in MiB
    parts = [("base", "base_bytes", _gib), ("adapters", "adapter_bytes", _mib), ("optim.", "optimizer_bytes", _mib)]
    parts, width, units = (parts, 39, "(GiB; adapters, optim.: MiB)") if lora else ([], 42, "(GiB)")
    print(f"  {'option':<{width}}" + "".join(f"{title:>9}" for title, _, _ in parts) + f"{'states':>8}{'activ.':>8}"
          f"{'total':>8}  {'host/node':>10}  {'nvme/node':>10}  fits   {units}")
    for row in result["options"]:
        mark = "  <- --ds_config" if row["asked"] else ""
        nvme = _gib(row["nvme_bytes"]) if row["nvme"] else "-"
        print(f"  {row['name']:<{width}}" + "".join(f"{unit(row[key]):>9}" for _, key, unit in parts)
              + f"{_gib(row['gpu_bytes']):>8}{_gib(row['activations']):>8}{_gib(row['gpu_total']):>8}"
              f"  {_gib(row['host_bytes']):>10}  {nvme:>10}  {'yes' if row['fits'] else 'no ':<5}{mark}")
    if ds is not None and asked is None:
        print(f"\n--ds_config asks for ZeRO-{zero_stage(ds)} with parameter offload but no optimizer offload, which "
              f"DeepSpeed's estimators do not cover")
    return 0
