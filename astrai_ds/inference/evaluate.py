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
            if not isinstance(record, dict) or not any(k in record for k in ("text", "prompt", "messages")):
                raise DataError(f"{path}:{lineno}: expected an object with 'prompt' and 'answer', 'text', or "
                                f"'messages'")
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
    # The answer ends at the first sentence end, so generation can stop there too.
    stop = {tokenizer.eos_id} | {ids[0] for ids in tokenizer.encode_batch([".", "。"]) if len(ids) == 1}
    hits, by_task = [], defaultdict(list)
    for start in range(0, len(qa), batch_size):
        outs = greedy_generate(model, prompts[start:start + batch_size], max_new_tokens, stop)
        for record, out in zip(qa[start:start + batch_size], outs):
            hit = extract_answer(tokenizer.decode(out)) == record["answer"].strip()
            hits.append(hit)
            by_task[f"{record.get('task', 'all')}/{record.get('lang', 'all')}"].append(hit)
    result["exact_match"] = sum(hits) / len(hits)
    result["per_task"] = {k: sum(v) / len(v) for k, v in sorted(by_task.items())}
    return result


def _prompt_messages(record: dict) -> list[dict]:
    prompt = record.get("messages", record.get("prompt"))
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def evaluate_chat(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int | None = None,
                  responses: list | None = None) -> dict:
    """Greedy answers to chat-formatted held-out questions: {"chat_exact_match" (the answer's value is right),
    "chat_response_match" (the whole response is right, a full answer's justification included),
    "preferred_style_rate"}.

    A record holds `messages` (the conversation up to the question), `answers` (the accepted forms, one per
    style) and `preferred` (the style the preference pairs favour). A `responses` list, when given, receives
    one {"question", "response", "correct", "exact_response", "style", "answers"} per record."""
    from astrai_ds.data.chat import render_chat
    from astrai_ds.data.corpus import answer_style, chat_answer_correct, chat_response_exact

    model.eval()
    prompts = [render_chat(tokenizer, _prompt_messages(r), add_generation_prompt=True)[0] for r in records]
    if max_new_tokens is None:  # room for the longest accepted answer, and a little more
        forms = [form for r in records
                 for form in (*r.get("answers", {"": r.get("answer", "")}).values(), *r.get("full_forms", ()))]
        max_new_tokens = max(len(ids) for ids in tokenizer.encode_batch(forms)) + 4
    stop = {tokenizer.im_end_id, tokenizer.eos_id}
    correct, exact, preferred = [], [], []
    for start in range(0, len(records), batch_size):
        outs = greedy_generate(model, prompts[start:start + batch_size], max_new_tokens, stop)
        for record, out in zip(records[start:start + batch_size], outs):
            response = tokenizer.decode(out)
            style = answer_style(response, record)
            correct.append(chat_answer_correct(response, record))
            exact.append(chat_response_exact(response, record))
            preferred.append(style == record.get("preferred"))
            if responses is not None:
                responses.append({"question": _prompt_messages(record)[-1]["content"], "response": response,
                                  "correct": correct[-1],
                                  "exact_response": exact[-1], "style": style, "answers": record.get("answers")})
    return {"chat_exact_match": sum(correct) / len(correct), "chat_response_match": sum(exact) / len(exact),
            "preferred_style_rate": sum(preferred) / len(preferred),
            "n_chat": len(records)}


def evaluate_pairs(model, tokenizer, records: list[dict]) -> dict:
    """{"pref_accuracy"}: the share of held-out pairs where the model gives the chosen response a higher
    log-prob than the rejected one (each response scored with its closing <|im_end|>)."""
    from astrai_ds.data.chat import render_chat
    from astrai_ds.inference.generate import sequence_logprob

    model.eval()
    wins = []
    for record in records:
        prompt = render_chat(tokenizer, _prompt_messages(record), add_generation_prompt=True)[0]
        chosen = tokenizer.encode(record["chosen"]) + [tokenizer.im_end_id]
        rejected = tokenizer.encode(record["rejected"]) + [tokenizer.im_end_id]
        wins.append(sequence_logprob(model, prompt, chosen) > sequence_logprob(model, prompt, rejected))
    return {"pref_accuracy": sum(wins) / len(wins), "n_pairs": len(records)}
