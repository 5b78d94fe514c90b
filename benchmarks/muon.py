#!/usr/bin/env python
"""Muon against AdamW: the loss each optimizer reaches after the same tokens, and its tokens/s, in one run.

Two `python train.py` runs (one rank, all threads) of the same train config (--config, by default
configs/train/pt_small.json: the `small` model on the quickstart's pretraining shards) with the same seed, data
order and learning-rate schedule, --steps steps each (warm-up the first 5%, then the config's schedule over the
run), differing only in the optimizer:

  adamw   the config's optimizer (AdamW for every parameter, gradient clipping as configured)
  muon    optimizer.type "muon": DeepSpeed's Muon at --muon-lr for the blocks' matrices, AdamW at the config's lr for
          the embedding, the head and the norms, no gradient clipping (DeepSpeed 0.19 would clip Muon's update)

Reported per run: the training loss (mean of the last 5 logged steps), the held-out loss at the end (the config's
data.eval_path), the median tokens/s over the logged steps after the first, and the tokens trained on.

    scripts/quickstart.sh        # or any run that wrote runs/quickstart/tokenizer and runs/quickstart/data/pt*
    .venv/bin/python benchmarks/muon.py --steps 200 --json /tmp/muon.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import ForeignLoad, announce, arg_parser  # noqa: E402  (benchmarks/machine.py)
from train_throughput import run_train  # noqa: E402  (train.py in the trainer's environment: venv, DeepSpeed's ops)


def parse_args(argv=None) -> argparse.Namespace:
    p = arg_parser(__doc__)
    p.add_argument("--config", type=Path, default=ROOT / "configs/train/pt_small.json",
                   help="train config both runs share (default: configs/train/pt_small.json)")
    p.add_argument("--ds-config", default="zero2.json", help="DeepSpeed config (default: zero2.json)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default: 200)")
    p.add_argument("--muon-lr", type=float, default=0.02, help="Muon's learning rate (default: 0.02)")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="more train config overrides for both runs")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds allowed for each run")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 20:
        p.error("--steps must be at least 20")
    return args


def train(args, name: str, run_dir: Path, sets: list[str]) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    n = args.steps
    run_train(args.config, args.ds_config,
              [f"output_dir={run_dir}", f"max_steps={n}", f"schedule.total_steps={n}",
               f"schedule.warmup_steps={max(1, n // 20)}", "log_interval=10", f"eval_interval={n}",
               "save_interval=1000000000", "resume=none", *sets, *args.overrides],
              run_dir.parent / f"{name}.log", args.timeout)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    return {"optimizer": name, "train_loss": statistics.mean(r["train/loss"] for r in steps[-5:]),
            "eval_loss": evals[-1]["eval/loss"] if evals else None,
            "tokens_per_sec": statistics.median(r["train/tokens_per_sec"] for r in steps[1:]),
            "tokens": steps[-1].get("train/tokens_seen"), "losses": {r["step"]: r["train/loss"] for r in steps}}


def main() -> None:
    args = parse_args()
    info = announce()
    tmp = None if args.work_dir else tempfile.mkdtemp(prefix="bench_muon_")
    work = args.work_dir or Path(tmp)
    load = ForeignLoad()
    try:
        results = [train(args, "adamw", work / "adamw", []),
                   train(args, "muon", work / "muon", ["optimizer.type=muon", f"optimizer.muon_lr={args.muon_lr}",
                                                       "optimizer.grad_clip=0"])]
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.config.name}, {args.ds_config}, {args.steps} steps each, one rank "
          f"(other work kept {load.share():.0%} of the CPU busy meanwhile)")
    print(f"{'optimizer':>10} {'train loss':>11} {'eval loss':>10} {'tokens/s':>9} {'vs adamw':>9} {'tokens':>10}")
    for r in results:
        print(f"{r['optimizer']:>10} {r['train_loss']:>11.4f} {r['eval_loss'] or float('nan'):>10.4f} "
              f"{r['tokens_per_sec']:>9.0f} {r['tokens_per_sec'] / results[0]['tokens_per_sec']:>8.2f}x "
              f"{r['tokens'] or 0:>10}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "steps": args.steps, "config": str(args.config),
                                         "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
