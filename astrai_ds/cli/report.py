"""Summarise a stage's run and evaluations into report.json (merged per stage) and print the table:
eval loss, exact match on held-out facts, chat exact match (answer; whole response), preference accuracy, preferred-style rate,
training tokens/s and wall time. `--eval` takes one or more files: what `astrai-ds eval --out` writes, and what
`astrai-ds rag eval --out` writes (recall at k per retrieval mode, answers closed-book, with retrieval and with the
gold passage); their fields, and their per-language fields ("en", "zh"), are merged into the stage's entry.
`--run` adds the run's training tokens/s; leave it out for a model that was not trained (`--stage rag`, or
`--stage base` for a pretrained model before fine-tuning)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from astrai_ds.errors import DataError

NAME = "report"
HELP = "summarise runs and evaluations into a table"


def add_arguments(p) -> None:
    p.add_argument("--stage", required=True,
                   help="the stage's key in the report (pt, sft, dpo), or rag for `astrai-ds rag eval --out`")
    p.add_argument("--run", default=None,
                   help="the run folder (for tokens/s from metrics.jsonl); leave out for a model not trained here")
    p.add_argument("--eval", required=True, nargs="+", metavar="FILE",
                   help="JSON written by `astrai-ds eval --out` and/or `astrai-ds rag eval --out` (one or more)")
    p.add_argument("--out", required=True, help="report.json to create or update")
    p.add_argument("--wall-time", type=float, default=None, help="seconds the stage took")


def _read_json_object(path: Path, what: str, fix: str) -> dict:
    """The JSON object in `path`; a DataError naming the file, what is wrong with it and `fix` otherwise."""
    if not path.is_file():
        raise DataError(f"{what} {path} {'is a folder' if path.is_dir() else 'not found'}; {fix}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise DataError(f"{what} {path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def training_tokens_per_sec(run_dir: Path) -> float:
    """Median tokens/s over the logged steps, leaving out the first log (it includes warm-up)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"--run {run_dir}: {path.name} not found; give --run the output_dir of a training run")
    rates = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); a line of the training log is damaged") from None
        if isinstance(record, dict) and "train/tokens_per_sec" in record:
            rates.append(record["train/tokens_per_sec"])
    return statistics.median(rates[1:] or rates) if rates else float("nan")


METRICS = ("eval_loss", "exact_match", "chat_exact_match", "chat_response_match", "chat_contains", "pref_accuracy",
           "preferred_style_rate")
COLUMNS = (("eval_loss", "eval_loss", "{:.4f}"), ("exact_match", "exact_match", "{:.3f}"),
           ("chat_exact_match", "chat_em", "{:.3f}"), ("chat_response_match", "chat_resp", "{:.3f}"),
           ("chat_contains", "chat_has", "{:.3f}"),
           ("pref_accuracy", "pref_acc", "{:.3f}"),
           ("preferred_style_rate", "pref_style", "{:.3f}"), ("tokens_per_sec", "tokens/s", "{:.0f}"),
           ("wall_time_s", "wall time", "{:.0f}s"))


RAG = "rag"
RAG_METRICS = ("answer_em_closed_book", "answer_em_rag", "answer_em_oracle")
CONTAINS_METRICS = ("answer_contains_closed_book", "answer_contains_rag", "answer_contains_oracle")


def _rag_line(name: str, rag: dict) -> str:
    recall = next((v for k, v in rag.items() if k.startswith("recall_at_")), {})
    line = (f"{name}: " + ", ".join(f"{key.removeprefix('answer_em_')} {rag[key]:.3f}" for key in RAG_METRICS)
            + "  (exact answers on held-out documents)")
    if all(key in rag for key in CONTAINS_METRICS):
        line += "; contained: " + ", ".join(f"{rag[key]:.3f}" for key in CONTAINS_METRICS)
    return line + "; recall at k: " + ", ".join(f"{mode} {value:.3f}" for mode, value in recall.items())


def format_table(report: dict) -> str:
    lines = [f"{'stage':<6}" + "".join(f"{title:>12}" for _, title, _ in COLUMNS)]
    rag_lines = []
    for stage, entry in report.items():
        if any(entry.get(key) is not None for key in METRICS):  # a RAG-only entry has its own line below
            cells = [fmt.format(entry[key]) if entry.get(key) is not None else "-" for key, _, fmt in COLUMNS]
            lines.append(f"{stage:<6}" + "".join(f"{c:>12}" for c in cells))
        if all(key in entry for key in RAG_METRICS):
            rag_lines.append(_rag_line(stage, entry))
            rag_lines += [_rag_line(f"  {lang}", entry[lang]) for lang in languages(entry)
                          if all(key in entry[lang] for key in RAG_METRICS)]
    return "\n".join(lines + ([""] + rag_lines if rag_lines else []))


def languages(evaluation: dict) -> list[str]:
    """The keys of an evaluation that hold the same metrics for one language ("en", "zh")."""
    return [key for key, value in evaluation.items()
            if isinstance(value, dict) and any(k in value for k in METRICS + RAG_METRICS)]


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _stage_entry(evaluation: dict, eval_path: Path, fix: str) -> dict:
    entry = {key: evaluation[key] for key in METRICS if key in evaluation}
    if not entry:
        raise DataError(f"--eval {eval_path} holds none of the metrics ({', '.join(METRICS)}); {fix}")
    for key, value in entry.items():
        if not _is_number(value):
            raise DataError(f"--eval {eval_path}: {key} is {json.dumps(value)}, not a number; {fix}")
    for lang in languages(evaluation):
        entry[lang] = {key: value for key, value in evaluation[lang].items() if key in METRICS and _is_number(value)}
    return entry


def _is_rag(evaluation: dict) -> bool:
    return any(key.startswith("recall_at_") for key in evaluation)


def _merge(entry: dict, more: dict) -> None:
    """Add `more` to `entry`; the per-language dicts are merged, not replaced."""
    langs = languages(more)
    for key, value in more.items():
        if key in langs and isinstance(entry.get(key), dict):
            entry[key].update(value)
        else:
            entry[key] = value


def _rag_entry(evaluation: dict, eval_path: Path) -> dict:
    fix = "for --stage rag give --eval the file written by `astrai-ds rag eval ... --out FILE`"
    recall = [key for key in evaluation if key.startswith("recall_at_")]
    missing = [key for key in RAG_METRICS if key not in evaluation] + ([] if recall else ["recall_at_k"])
    if missing:
        raise DataError(f"--eval {eval_path} lacks {', '.join(missing)}; {fix}")
    values = [evaluation[key] for key in RAG_METRICS]
    values += list(evaluation[recall[0]].values()) if isinstance(evaluation[recall[0]], dict) else [None]
    if not all(map(_is_number, values)):
        raise DataError(f"--eval {eval_path}: a RAG metric is not a number; {fix}")
    return dict(evaluation)


def run(args) -> int:
    out = Path(args.out)
    fix = "give --eval the file written by `astrai-ds eval ... --out FILE`"
    entry: dict = {}
    for eval_path in map(Path, args.eval):
        evaluation = _read_json_object(eval_path, "--eval", fix)
        if args.stage == RAG or _is_rag(evaluation):
            _merge(entry, _rag_entry(evaluation, eval_path))
        else:
            _merge(entry, _stage_entry(evaluation, eval_path, fix))
    report = (_read_json_object(out, "--out", "give --out another file, or move this one away")
              if out.exists() else {})
    if not all(isinstance(stage, dict) for stage in report.values()):
        raise DataError(f"--out {out} is not a report (an object of stages, each an object of metrics); give --out "
                        f"another file, or move this one away")
    if args.run is not None:
        entry["tokens_per_sec"] = training_tokens_per_sec(Path(args.run))
    if args.wall_time is not None:
        entry["wall_time_s"] = args.wall_time
    report[args.stage] = entry
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + format_table(report) + f"\n\nwrote {out}")
    return 0
