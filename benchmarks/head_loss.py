#!/usr/bin/env python
"""The chunked head loss (`fused_loss`, model/head_loss.py) against the loss from the whole logits, in one run:
peak memory and time of one training micro-step (forward and backward) at two vocabulary sizes.

Each (vocabulary, way) runs in a fresh process: the model (`--model`'s shape, by default the `small` preset, with
the vocabulary set to 2,048 and to 49,152, SmolLM2's, Qwen's and Llama 3's size) is built with the same seed,
then --steps micro-steps of the PT strategy run on the same random batch of --batch x --seq-len tokens, each
`compute_loss` and `backward`, with the strategy's `fused` off (whole logits: the (B, T, V) logits, their float32
copy and the log-softmax) or on (chunks of `head_loss.chunk_tokens(V)` tokens). Reported per way:

  peak memory   the process's peak resident memory (ru_maxrss) over the steps, less its resident memory just
                before the first one (the model, its inputs and the interpreter): what the steps added at most
  s per step    the median over the steps after the first
  loss          the first step's loss: the same in both ways within float32 rounding

Precision: bf16 weights where the CPU has native bf16 (as precision "auto" trains), else float32; --dtype sets it.

    .venv/bin/python benchmarks/head_loss.py
    .venv/bin/python benchmarks/head_loss.py --vocab 2048 49152 --batch 4 --seq-len 1024 --json /tmp/head_loss.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import announce, arg_parser  # noqa: E402  (benchmarks/machine.py)


def parse_args(argv=None) -> argparse.Namespace:
    p = arg_parser(__doc__)
    p.add_argument("--model", type=Path, default=ROOT / "configs/model/small.json",
                   help="model config whose shape is measured (default: configs/model/small.json)")
    p.add_argument("--vocab", type=int, nargs="+", default=[2048, 49152],
                   help="vocabulary sizes (default: 2048 49152)")
    p.add_argument("--batch", type=int, default=8, help="rows per micro-step (default: 8)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per row (default: 512)")
    p.add_argument("--steps", type=int, default=4,
                   help="micro-steps per way, the first left out of the time (default: 4)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="weights' dtype; auto: bf16 where the CPU has native bf16 (default: auto)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--child", nargs=2, metavar=("VOCAB", "FUSED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 2 or args.batch < 1 or args.seq_len < 2:
        p.error("--steps must be at least 2, --batch and --seq-len positive")
    return args


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(args) -> None:
    """One way at one vocabulary size, in this fresh process: prints a JSON line."""
    import torch

    from astrai_ds.config.model import ModelConfig
    from astrai_ds.model import Transformer
    from astrai_ds.training.strategies import PretrainStrategy

    vocab, fused = int(args.child[0]), args.child[1] == "1"
    cfg = ModelConfig.load(args.model).resolved(vocab)
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = Transformer(cfg).to(dtype).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len + 1), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    strategy = PretrainStrategy()
    strategy.fused = fused
    start = _rss_bytes()
    times, loss0 = [], None
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _ = strategy.compute_loss(model, batch)
        loss.backward()
        times.append(time.perf_counter() - t0)
        loss0 = loss0 if loss0 is not None else loss.item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"vocab": vocab, "fused": fused, "peak_added_mib": (peak - start) / 2**20,
                      "seconds_per_step": statistics.median(times[1:]), "loss": loss0,
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6}))


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    info = announce()
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if info.get("bf16_native") else "fp32")
    results = []
    for vocab in args.vocab:
        for fused in (False, True):
            cmd = [sys.executable, __file__, "--child", str(vocab), str(int(fused)), "--model", str(args.model),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
                   "--dtype", dtype]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"  vocab {vocab:>6} {'chunked' if fused else 'whole logits':>12}: "
                  f"peak +{r['peak_added_mib']:.0f} MiB, {r['seconds_per_step']:.3f} s/step, loss {r['loss']:.5f}",
                  flush=True)
    print(f"\n{args.model.stem} model, {dtype}, micro-step of {args.batch} x {args.seq_len} tokens, "
          f"forward and backward")
    print(f"{'vocab':>7} {'way':>13} {'peak MiB':>9} {'s/step':>8} {'loss':>9} {'memory vs whole':>16} "
          f"{'time vs whole':>14}")
    for vocab in args.vocab:
        whole, chunked = [r for r in results if r["vocab"] == vocab]
        for r in (whole, chunked):
            print(f"{vocab:>7} {'chunked' if r['fused'] else 'whole logits':>13} {r['peak_added_mib']:>9.0f} "
                  f"{r['seconds_per_step']:>8.3f} {r['loss']:>9.5f} "
                  f"{r['peak_added_mib'] / whole['peak_added_mib']:>15.2f}x "
                  f"{r['seconds_per_step'] / whole['seconds_per_step']:>13.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "dtype": dtype, "batch": args.batch,
                                         "seq_len": args.seq_len, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
