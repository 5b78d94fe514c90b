"""Held-out evaluation of a model folder: token loss on the eval texts and exact match of greedy answers.

An eval record is a JSON line with `prompt` and `answer` (and optionally `text`, the full sentence).
Exact match: the greedy continuation of `<bos> prompt`, cut at the first sentence end, equals `answer`.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from astrai_ds.errors import DataError
from astrai_ds.inference.generate import greedy_generate
from astrai_ds.training.losses import IGNORE_INDEX, token_cross_entropy

_ANSWER_END = re.compile(r"[.。!?！？\n]")


def read_eval_records(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval data not found: {path} (the built-in one is written by `astrai-ds corpus --out DIR`)")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not (isinstance(record.get("text"), str)
                                                    or isinstance(record.get("prompt"), str)):
                raise DataError(f"{path}:{lineno}: expected an object with 'prompt' and 'answer' or with 'text'")
            records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def extract_answer(completion: str) -> str:
    """The answer part of a greedy completion: up to the first sentence end, without surrounding spaces."""
    return _ANSWER_END.split(completion.strip(), maxsplit=1)[0].strip()


def full_text(record: dict) -> str:
    if "text" in record:
        return record["text"]
    sep = "" if re.search(r"[\u4e00-\u9fff]", record["prompt"][-1:]) else " "
    return record["prompt"] + sep + record.get("answer", "")


@torch.no_grad()
def eval_loss(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Mean next-token loss over `<bos> text <eos>` of every text, as the training windows see documents."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(texts), batch_size):
        seqs = [[tokenizer.bos_id] + ids + [tokenizer.eos_id]
                for ids in tokenizer.encode_batch(texts[start:start + batch_size])]
        seqs = [s[: model.cfg.max_seq_len + 1] for s in seqs]
        T = max(len(s) for s in seqs) - 1
        input_ids = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(seqs):  # right padding: pads come after every real token, so causality hides them
            input_ids[row, : len(s) - 1] = torch.tensor(s[:-1])
            labels[row, : len(s) - 1] = torch.tensor(s[1:])
        n = int((labels != IGNORE_INDEX).sum())
        loss = token_cross_entropy(model(input_ids.to(device)), labels.to(device))
        total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


def evaluate_model(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int | None = None) -> dict:
    """{"eval_loss", "exact_match", "n", "per_task": {task: exact match}} over `records`."""
    model.eval()
    result = {"eval_loss": eval_loss(model, tokenizer, [full_text(r) for r in records], batch_size),
              "n": len(records)}
    qa = [r for r in records if isinstance(r.get("prompt"), str) and isinstance(r.get("answer"), str)]
    if not qa:
        return result
    prompts = [[tokenizer.bos_id] + ids for ids in tokenizer.encode_batch([r["prompt"] for r in qa])]
    if max_new_tokens is None:
        max_new_tokens = max(len(ids) for ids in tokenizer.encode_batch([r["answer"] for r in qa])) + 4
    hits, by_task = [], defaultdict(list)
    for start in range(0, len(qa), batch_size):
        outs = greedy_generate(model, prompts[start:start + batch_size], max_new_tokens, {tokenizer.eos_id})
        for record, out in zip(qa[start:start + batch_size], outs):
            hit = extract_answer(tokenizer.decode(out)) == record["answer"].strip()
            hits.append(hit)
            by_task[f"{record.get('task', 'all')}/{record.get('lang', 'all')}"].append(hit)
    result["exact_match"] = sum(hits) / len(hits)
    result["per_task"] = {k: sum(v) / len(v) for k, v in sorted(by_task.items())}
    return result
