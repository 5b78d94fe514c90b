"""Task files for EleutherAI's lm-evaluation-harness (`lm_eval`) over the corpus's held-out sets, written by
`astrai-ds corpus` into `lm_eval/` beside the data, with the data files' absolute paths filled in. They read local
JSONL (`dataset_path: json`), so nothing is downloaded; `lm_eval --model local-completions` runs them against
`astrai-ds serve` (docs/lm_eval.md):

- `astrai_pairs` (multiple choice, `dpo_eval.jsonl`): the chosen and the rejected response, each closed by
  `<|im_end|>`; `acc` is `astrai-ds eval --pairs`'s `pref_accuracy`.
- `astrai_chat` (generation, `sft_eval.jsonl`): a greedy answer up to `<|im_end|>`; `exact_match` (the whole answer is
  one of the accepted forms, spaces at either end aside) is `astrai-ds eval --chat`'s `chat_response_match`.
- `astrai_text` (perplexity, `pretrain_eval.jsonl`): the held-out texts' word and byte perplexity, bits per byte.
- `astrai_reading` (generation, `reading_eval.jsonl`): a held-out article's question with the section that answers
  it in the prompt, as `astrai-ds rag eval` asks its oracle questions; `answer_em` and `answer_contains` are scored
  by the functions `rag eval` scores with (`astrai_metrics.py`, so lm_eval runs where astrai_ds is installed).
- `astrai`: the group of the four.

The chat tasks give a record's messages as lm-eval's chat turns (a system message as the task's per-record
`description`, the user's question as the text), so `--apply_chat_template` renders them with the model's own
template, as `astrai-ds eval` does. The responses close with `<|im_end|>`, ChatML's end of turn: the built-in models'
template and SmolLM2's.
"""

from __future__ import annotations

import json
from pathlib import Path

TASKS_DIR = "lm_eval"
READING_EVAL_FILE = "reading_eval.jsonl"
CHAT_MAX_GEN_TOKS = 64  # room for the longest accepted answer; leaves a 256-token context 191 for the prompt
READING_MAX_GEN_TOKS = 32  # `rag eval`'s default max_new_tokens

# A record's first message, when it is the system's, is lm-eval's per-record description: its system turn.
_SYSTEM = "\"{% if {m}[0].role == 'system' %}{{ {m}[0].content }}{% endif %}\""
_QUESTION = "\"{{ {m}[-1].content }}\""
_END_OF_TURN = "<|im_end|>"


def _header(name: str, data: Path, output_type: str) -> str:
    return (f"# Written by `astrai-ds corpus`; see docs/lm_eval.md.\n"
            f"task: {name}\n"
            f"dataset_path: json\n"
            f"dataset_kwargs:\n"
            f"  data_files:\n"
            f"    test: {json.dumps(str(data))}\n"
            f"test_split: test\n"
            f"output_type: {output_type}\n")


def _chat_prompt(messages: str) -> str:
    return (f"description: {_SYSTEM.replace('{m}', messages)}\n"
            f"doc_to_text: {_QUESTION.replace('{m}', messages)}\n")


def _generation(max_gen_toks: int) -> str:
    return (f"generation_kwargs:\n"
            f"  until: [{json.dumps(_END_OF_TURN)}]\n"
            f"  max_gen_toks: {max_gen_toks}\n"
            f"  do_sample: false\n"
            f"  temperature: 0.0\n")


def _metrics(*names: str, aggregations: tuple[str, ...] = (), higher_is_better: bool = True, extra: str = "") -> str:
    """lm-eval's metric_list: each metric with its aggregation (default: the mean) and direction."""
    aggregations = aggregations or ("mean",) * len(names)
    return "metric_list:\n" + "".join(f"  - metric: {n}\n    aggregation: {a}\n    higher_is_better: "
                                      f"{str(higher_is_better).lower()}\n{extra}" for n, a in zip(names, aggregations))


_VERSION = "metadata:\n  version: 1.0\n"

METRICS_MODULE = '''"""Scores of the astrai_reading task: astrai_ds's own functions, as `astrai-ds rag eval` scores
its answers."""

from astrai_ds.inference.scoring import answer_contained
from astrai_ds.rag.evaluate import answer_value


def reading_scores(doc, results):
    response = results[0]
    return {"answer_em": float(answer_value(response) == doc["answer"]),
            "answer_contains": float(answer_contained(response, doc["answer"]))}
'''


def task_files(data_dir: Path) -> dict[str, str]:
    """{file name: text} of the task files over the held-out files in `data_dir` (absolute paths)."""
    d = Path(data_dir).resolve()
    end = _END_OF_TURN
    pairs = (_header("astrai_pairs", d / "dpo_eval.jsonl", "multiple_choice") + _chat_prompt("prompt")
             + f"doc_to_choice: \"{{{{ [chosen + '{end}', rejected + '{end}'] }}}}\"\n"
             + "doc_to_target: 0\ntarget_delimiter: \"\"\n" + _metrics("acc") + _VERSION)
    chat = (_header("astrai_chat", d / "sft_eval.jsonl", "generate_until") + _chat_prompt("messages")
            + "doc_to_target: \"{{ [answers.plain] + (full_forms or [answers.full]) }}\"\n"
            + _generation(CHAT_MAX_GEN_TOKS)
            + _metrics("exact_match", extra="    regexes_to_ignore: [\"^\\\\s+\", \"\\\\s+$\"]\n") + _VERSION)
    text = (_header("astrai_text", d / "pretrain_eval.jsonl", "loglikelihood_rolling")
            + "doc_to_text: \"\"\ndoc_to_target: \"{{ text }}\"\n"
            + _metrics("word_perplexity", "byte_perplexity", "bits_per_byte", higher_is_better=False,
                       aggregations=("weighted_perplexity", "weighted_perplexity", "bits_per_byte"))
            + _VERSION)
    reading = (_header("astrai_reading", d / READING_EVAL_FILE, "generate_until") + _chat_prompt("messages")
               + "doc_to_target: \"{{ answer }}\"\n" + _generation(READING_MAX_GEN_TOKS)
               + "process_results: !function astrai_metrics.reading_scores\n"
               + _metrics("answer_em", "answer_contains") + _VERSION)
    group = ("# Written by `astrai-ds corpus`; see docs/lm_eval.md.\ngroup: astrai\n"
             "task:\n  - astrai_pairs\n  - astrai_chat\n  - astrai_text\n  - astrai_reading\n" + _VERSION)
    return {"astrai_pairs.yaml": pairs, "astrai_chat.yaml": chat, "astrai_text.yaml": text,
            "astrai_reading.yaml": reading, "astrai.yaml": group, "astrai_metrics.py": METRICS_MODULE}


def write_task_files(data_dir: Path, out_dir: Path | None = None) -> Path:
    """Write the task files over `data_dir`'s held-out files into `out_dir` (default: data_dir/lm_eval)."""
    out = Path(out_dir) if out_dir is not None else Path(data_dir) / TASKS_DIR
    out.mkdir(parents=True, exist_ok=True)
    for name, text in task_files(data_dir).items():
        (out / name).write_text(text, encoding="utf-8")
    return out
