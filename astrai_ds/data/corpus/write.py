"""`write_corpus`: the training facts as `pretrain.jsonl` and the held-out prompts as `pretrain_eval.jsonl`,
the same split as chat data (`sft.jsonl`, `dpo.jsonl`, `grpo.jsonl` and their `_eval` sets), and articles about
fictional entities for retrieval (`documents.jsonl` for training, `documents_eval.jsonl` held out)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from astrai_ds.data.corpus.chat_forms import (DPO_PAIRS, GRPO_PROMPTS, SFT_CONVERSATIONS, dpo_eval_records,
                                              dpo_records, grpo_records, sft_eval_records, sft_records)
from astrai_ds.data.corpus.documents import articles, drill_articles, split_articles
from astrai_ds.data.corpus.facts import LANGS, TASKS, Fact
from astrai_ds.data.corpus.lm_eval_tasks import READING_EVAL_FILE, write_task_files
from astrai_ds.data.corpus.reading import (READING_CONVERSATIONS, reading_eval_records, reading_records,
                                           reading_texts)
from astrai_ds.data.corpus.split import per_task_lang, sample_renderings, split_facts
from astrai_ds.data.sources import check_out_dir
from astrai_ds.errors import DataError

PRETRAIN_FILE = "pretrain.jsonl"
EVAL_FILE = "pretrain_eval.jsonl"
SFT_FILE = "sft.jsonl"
SFT_EVAL_FILE = "sft_eval.jsonl"
DPO_FILE = "dpo.jsonl"
DPO_EVAL_FILE = "dpo_eval.jsonl"
GRPO_FILE = "grpo.jsonl"
GRPO_EVAL_FILE = "grpo_eval.jsonl"
DOCUMENTS_FILE = "documents.jsonl"
DOCUMENTS_EVAL_FILE = "documents_eval.jsonl"
READING_FILE = "reading.jsonl"
ARTICLES = 240  # articles about fictional entities, a quarter of them held out


def _write_lines(path: Path, records) -> int:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path.stat().st_size


def write_corpus(out_dir, seed: int = 0, scale: float = 1.0) -> dict:
    """Write under `out_dir`:

    - `pretrain.jsonl` ({"text"} per line, shuffled), `pretrain_eval.jsonl` ({"prompt", "answer", "text",
      "lang", "task"});
    - `sft.jsonl` ({"messages"}), `sft_eval.jsonl` (see `sft_eval_records`);
    - `dpo.jsonl` ({"prompt": messages, "chosen", "rejected"}), `dpo_eval.jsonl` (plus "task", "lang",
      "rejected_kind");
    - `grpo.jsonl` (questions from training renderings, in the form of `sft_eval.jsonl`), `grpo_eval.jsonl` (the
      very records of `sft_eval.jsonl`, so that GRPO's evaluation is the chat exact match);
    - `documents.jsonl` and `documents_eval.jsonl`: articles ({"id", "kind", "lang", "title", "text", "split",
      "qa": [{"question", "answer"}]}), split by entity. The training articles are also pretraining text (each
      followed by its questions and answers); they and generated drills make the reading-comprehension
      conversations in `sft.jsonl` (see `reading`), which `reading.jsonl` also holds alone (to fine-tune a
      pretrained model on reading alone); nothing in the other files mentions a held-out entity;
    - `reading_eval.jsonl`: each held-out article's questions with the section that answers them, as grounded chats;
    - `lm_eval/`: task files for lm-evaluation-harness over the held-out sets (`lm_eval_tasks`).

    The same seed gives byte-identical files; `scale` multiplies the number of training records but leaves
    the held-out split, and so the eval files, unchanged."""
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise DataError(f"corpus scale must be a positive number, got {scale!r}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"corpus seed must be a non-negative integer, got {seed!r}")
    out = check_out_dir(out_dir, "the corpus")
    split = split_facts(seed)
    train_by_task: dict[str, list[Fact]] = {name: [] for name in TASKS}
    for f in split.train:
        train_by_task[f.task].append(f)
    records: list[Fact] = []
    counts: dict[str, dict] = {}
    for name, task in TASKS.items():
        n = max(1, round(task.pretrain_records * scale))
        records += sample_renderings(train_by_task[name], n, random.Random(f"sample:{seed}:{name}"))
        counts[name] = {"pretrain": n, "eval": sum(f.task == name for f in split.eval),
                        "sft": per_task_lang(SFT_CONVERSATIONS, scale) * len(LANGS),
                        "dpo": per_task_lang(DPO_PAIRS, scale) * len(LANGS),
                        "grpo": per_task_lang(GRPO_PROMPTS, scale) * len(LANGS)}
    doc_train, doc_eval = split_articles(articles(ARTICLES, seed), seed=seed)
    n_conversations = max(1, round(READING_CONVERSATIONS * scale))
    texts = [f.text for f in records] + reading_texts(doc_train, seed)
    random.Random(f"shuffle:{seed}").shuffle(texts)
    reading = reading_records(doc_train + drill_articles(n_conversations, seed, avoid=doc_eval), n_conversations, seed)
    sft = sft_records(seed, scale) + reading
    random.Random(f"sft-shuffle:{seed}").shuffle(sft)

    out.mkdir(parents=True, exist_ok=True)
    pretrain_bytes = _write_lines(out / PRETRAIN_FILE, ({"text": t} for t in texts))
    eval_bytes = _write_lines(out / EVAL_FILE, (f.eval_record() for f in split.eval))
    chat_eval = sft_eval_records(seed)
    chat = {SFT_FILE: sft, SFT_EVAL_FILE: chat_eval, DPO_FILE: dpo_records(seed, scale),
            DPO_EVAL_FILE: dpo_eval_records(seed), GRPO_FILE: grpo_records(seed, scale), GRPO_EVAL_FILE: chat_eval}
    for name, chat_records in chat.items():
        _write_lines(out / name, chat_records)
    _write_lines(out / DOCUMENTS_FILE, (a.record("train") for a in doc_train))
    _write_lines(out / DOCUMENTS_EVAL_FILE, (a.record("eval") for a in doc_eval))
    _write_lines(out / READING_FILE, reading)
    reading_eval = reading_eval_records(doc_eval)
    _write_lines(out / READING_EVAL_FILE, reading_eval)
    tasks_dir = write_task_files(out)
    return {
        "pretrain": str(out / PRETRAIN_FILE),
        "eval": str(out / EVAL_FILE),
        "pretrain_records": len(texts),
        "eval_items": len(split.eval),
        "pretrain_bytes": pretrain_bytes,
        "eval_bytes": eval_bytes,
        "sft": str(out / SFT_FILE),
        "sft_eval": str(out / SFT_EVAL_FILE),
        "dpo": str(out / DPO_FILE),
        "dpo_eval": str(out / DPO_EVAL_FILE),
        "sft_records": len(chat[SFT_FILE]),
        "sft_eval_items": len(chat[SFT_EVAL_FILE]),
        "dpo_records": len(chat[DPO_FILE]),
        "dpo_eval_items": len(chat[DPO_EVAL_FILE]),
        "grpo": str(out / GRPO_FILE),
        "grpo_eval": str(out / GRPO_EVAL_FILE),
        "grpo_records": len(chat[GRPO_FILE]),
        "grpo_eval_items": len(chat[GRPO_EVAL_FILE]),
        "documents": str(out / DOCUMENTS_FILE),
        "documents_eval": str(out / DOCUMENTS_EVAL_FILE),
        "documents_records": len(doc_train),
        "documents_eval_items": len(doc_eval),
        "reading_texts": len(doc_train),
        "reading": str(out / READING_FILE),
        "reading_records": len(reading),
        "reading_eval": str(out / READING_EVAL_FILE),
        "reading_eval_items": len(reading_eval),
        "lm_eval_tasks": str(tasks_dir),
        "tasks": counts,
    }
