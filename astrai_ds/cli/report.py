"""Summarise a stage's run and evaluation into report.json (merged per stage) and print the table:
eval loss, exact match on held-out facts, chat exact match (answer; whole response), preference accuracy, preferred-style rate,
training tokens/s and wall time."""

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
    p.add_argument("--wall-time", type=float, default=None, help="seconds the stage took")


def training_tokens_per_sec(run_dir: Path) -> float:
    """Median tokens/s over the logged steps, leaving out the first log (it includes warm-up)."""
    rates = [r["train/tokens_per_sec"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "train/tokens_per_sec" in r]
    return statistics.median(rates[1:] or rates) if rates else float("nan")


METRICS = ("eval_loss", "exact_match", "chat_exact_match", "chat_response_match", "pref_accuracy",
           "preferred_style_rate")
COLUMNS = (("eval_loss", "eval_loss", "{:.4f}"), ("exact_match", "exact_match", "{:.3f}"),
           ("chat_exact_match", "chat_em", "{:.3f}"), ("chat_response_match", "chat_resp", "{:.3f}"),
           ("pref_accuracy", "pref_acc", "{:.3f}"),
           ("preferred_style_rate", "pref_style", "{:.3f}"), ("tokens_per_sec", "tokens/s", "{:.0f}"),
           ("wall_time_s", "wall time", "{:.0f}s"))


def format_table(report: dict) -> str:
    lines = [f"{'stage':<6}" + "".join(f"{title:>12}" for _, title, _ in COLUMNS)]
    for stage, entry in report.items():
        cells = [fmt.format(entry[key]) if entry.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        lines.append(f"{stage:<6}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def run(args) -> int:
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    evaluation = json.loads(Path(args.eval).read_text())
    entry = {key: evaluation[key] for key in METRICS if key in evaluation}
    entry["tokens_per_sec"] = training_tokens_per_sec(Path(args.run))
    if args.wall_time is not None:
        entry["wall_time_s"] = args.wall_time
    report[args.stage] = entry
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + format_table(report) + f"\n\nwrote {out}")
    return 0
