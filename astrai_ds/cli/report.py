"""Summarise a stage's run and evaluation into report.json (merged per stage) and print the table:
eval loss, exact match on held-out facts, training tokens/s and wall time."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

NAME = "report"
HELP = "summarise runs and evaluations into a table"


def add_arguments(p) -> None:
    p.add_argument("--stage", required=True, help="the stage's key in the report (pt, sft, dpo)")
    p.add_argument("--run", required=True, help="the run folder (for tokens/s from metrics.jsonl)")
    p.add_argument("--eval", required=True, help="JSON written by `astrai-ds eval --out`")
    p.add_argument("--out", required=True, help="report.json to create or update")
    p.add_argument("--wall-time", type=float, default=None, help="seconds the whole job took")


def training_tokens_per_sec(run_dir: Path) -> float:
    """Median tokens/s over the logged steps, leaving out the first log (it includes warm-up)."""
    rates = [r["train/tokens_per_sec"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/tokens_per_sec" in r]
    return statistics.median(rates[1:] or rates) if rates else float("nan")


def run(args) -> int:
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    evaluation = json.loads(Path(args.eval).read_text())
    entry = {"eval_loss": evaluation["eval_loss"], "exact_match": evaluation.get("exact_match"),
             "tokens_per_sec": training_tokens_per_sec(Path(args.run))}
    if args.wall_time is not None:
        entry["wall_time_s"] = args.wall_time
    report[args.stage] = entry
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{'stage':<6} {'eval_loss':>10} {'exact_match':>12} {'tokens/s':>10} {'wall time':>10}")
    for stage, e in report.items():
        wall = f"{e['wall_time_s']:.0f}s" if "wall_time_s" in e else "-"
        em = f"{e['exact_match']:.3f}" if e.get("exact_match") is not None else "-"
        print(f"{stage:<6} {e['eval_loss']:>10.4f} {em:>12} {e['tokens_per_sec']:>10.0f} {wall:>10}")
    print(f"\nwrote {out}")
    return 0
