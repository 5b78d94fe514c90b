"""Held-out evaluation of a model folder: token loss on the eval texts and exact match of greedy answers,
greedy chat answers, and preference pairs.

A fact record is a JSON line with `prompt` and `answer` (and optionally `text`, the full sentence).
Exact match: the greedy continuation of `<bos> prompt`, cut at the first sentence end, equals `answer`.
Chat and pair records are described in `RECORD_KINDS`; every record is checked when it is read.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from astrai_ds.data.prompts import prompt_messages
from astrai_ds.data.sources import iter_json_lines
from astrai_ds.errors import DataError
from astrai_ds.inference.progress import Progress
from astrai_ds.model.losses import IGNORE_INDEX, token_loss_sum

_ANSWER_END = re.compile(r"[.。!?！？\n]")


# What each kind of eval record holds: (fields, the built-in corpus's file of that kind, the `eval` option).
RECORD_KINDS = {
    "facts": ("'prompt' and 'answer' strings, or a 'text' string", "pretrain_eval.jsonl", "--data"),
    "chat": ("'messages' ending with the user's question, and 'answers' with 'plain' and 'full' strings",
             "sft_eval.jsonl", "--chat"),
    "pairs": ("'prompt' (a string or messages) with 'chosen' and 'rejected' strings", "dpo_eval.jsonl", "--pairs"),
}


def _record_kind(record: dict) -> str | None:
    """The kind of eval record `record` looks like, by its fields, or None."""
    if "chosen" in record or "rejected" in record:
        return "pairs"
    if "messages" in record or "answers" in record:
        return "chat"
    if "prompt" in record or "text" in record:
        return "facts"
    return None


def _check_record(record: dict, kind: str) -> None:
    """Raise ValueError saying what keeps `record`, which looks like a `kind` record, from being one."""
    from astrai_ds.data.chat import check_messages, normalize_pair

    if kind == "facts":
        if not (isinstance(record.get("text"), str)
                or isinstance(record.get("prompt"), str) and isinstance(record.get("answer"), str)):
            raise ValueError("'prompt' and 'answer' are not both strings, and there is no 'text' string")
    elif kind == "chat":
        check_messages(prompt_messages(record), final="user")
        answers = record.get("answers")
        if not (isinstance(answers, dict) and all(isinstance(answers.get(k), str) for k in ("plain", "full"))):
            raise ValueError("'answers' is not an object with 'plain' and 'full' strings")
    else:
        normalize_pair(record)


def read_eval_records(path: str | Path, kind: str, option: str | None = None) -> list[dict]:
    """The records of a .jsonl eval file, each checked to be of `kind` (a key of RECORD_KINDS); raises
    DataError naming the file, the line, what is wrong and what to do. `option`: the command-line option that gave
    the file, for a command other than `astrai-ds eval` (whose option for each kind RECORD_KINDS names)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval data not found: {path} (the built-in one is written by `astrai-ds corpus --out DIR`)")
    fields, example, eval_option = RECORD_KINDS[kind]
    expected = f"{option or eval_option} expects {fields} on every line, as in {example}"
    records = []
    for lineno, record in iter_json_lines(path):
        seen = _record_kind(record) if isinstance(record, dict) else None
        if seen is None:
            raise DataError(f"{path}:{lineno}: not an eval record; {expected}")
        if seen != kind:
            what = f"{path}:{lineno}: a {seen} record (as in {RECORD_KINDS[seen][1]}), not a {kind} record"
            if option is None:  # astrai-ds eval reads the other kind with another option
                raise DataError(f"{what}: give this file with {RECORD_KINDS[seen][2]} instead of {eval_option}")
            raise DataError(f"{what}: {expected}")
        try:
            _check_record(record, kind)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}; {expected}") from None
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records; {expected}")
    return records


def _batches(n: int, batch_size: int, desc: str, unit: str, progress: bool):
    """The start of each batch of `n` items, with `progress` shown on stderr (see inference.progress)."""
    bar = Progress(n, desc, unit, progress)
    for start in range(0, n, batch_size):
        yield start
        bar.update(min(batch_size, n - start))
    bar.close()


def extract_answer(completion: str) -> str:
    """The answer part of a greedy completion: up to the first sentence end, without surrounding spaces."""
    return _ANSWER_END.split(completion.strip(), maxsplit=1)[0].strip()


def full_text(record: dict) -> str:
    if "text" in record:
        return record["text"]
    sep = "" if re.search(r"[\u4e00-\u9fff]", record["prompt"][-1:]) else " "
    return record["prompt"] + sep + record.get("answer", "")


@torch.no_grad()
def eval_loss(model, tokenizer, texts: list[str], batch_size: int = 32, *, progress: bool = False) -> float:
    """Mean next-token loss over `<bos> text <eos>` of every text, as the training windows see documents: the
    summed token loss of all of them divided by their token count (training's evaluation loss, too)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in _batches(len(texts), batch_size, "eval loss", "text", progress):
        seqs = [tokenizer.prefix_ids + ids + [tokenizer.eos_id]
                for ids in tokenizer.encode_batch(texts[start:start + batch_size])]
        seqs = [s[: model.cfg.max_seq_len + 1] for s in seqs]
        T = max(len(s) for s in seqs) - 1
        input_ids = torch.full((len(seqs), T), tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(seqs):  # right padding: pads come after every real token, so causality hides them
            input_ids[row, : len(s) - 1] = torch.tensor(s[:-1])
            labels[row, : len(s) - 1] = torch.tensor(s[1:])
        total += token_loss_sum(model(input_ids.to(device)), labels.to(device)).item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def _greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop: set[int], batch_size: int,
            desc: str, progress: bool, compile: bool = False) -> list[list[int]]:
    """Greedy continuations of token-id prompts through the generation engine (`batch_size` requests stepped
    together; `compile`: compiled decode steps); a prompt stops at a stop id, which is not included."""
    from astrai_ds.inference.engine import EngineConfig, LLMEngine
    from astrai_ds.inference.sampling import SamplingParams

    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=batch_size, compile=compile))
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=sorted(stop))
    completions = engine.generate_batch(prompts, params, progress=progress, desc=desc)
    refused = next((c.error for c in completions if c.error), None)
    if refused:
        raise DataError(f"{desc}: {refused}")
    return [c.token_ids for c in completions]


def evaluate_model(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int | None = None,
                   *, progress: bool = False, compile: bool = False) -> dict:
    """{"eval_loss", "exact_match", "n", "per_task": {task: exact match}} over `records` (fact records);
    `progress` shows the greedy answers' progress on stderr; `compile` decodes through compiled graphs."""
    model.eval()
    result = {"eval_loss": eval_loss(model, tokenizer, [full_text(r) for r in records], batch_size,
                                     progress=progress),
              "n": len(records)}
    qa = [r for r in records if isinstance(r.get("prompt"), str) and isinstance(r.get("answer"), str)]
    if not qa:
        return result
    prompts = [tokenizer.prefix_ids + ids for ids in tokenizer.encode_batch([r["prompt"] for r in qa])]
    if max_new_tokens is None:
        max_new_tokens = max(len(ids) for ids in tokenizer.encode_batch([r["answer"] for r in qa])) + 4
    # The answer ends at the first sentence end, so generation can stop there too.
    stop = set(tokenizer.stop_ids) | {ids[0] for ids in tokenizer.encode_batch([".", "。"]) if len(ids) == 1}
    hits, by_task = [], defaultdict(list)
    outs = _greedy(model, tokenizer, prompts, max_new_tokens, stop, batch_size, "eval exact match", progress, compile)
    for record, out in zip(qa, outs):
        hit = extract_answer(tokenizer.decode(out)) == record["answer"].strip()
        hits.append(hit)
        by_task[f"{record.get('task', 'all')}/{record.get('lang', 'all')}"].append(hit)
    result["exact_match"] = sum(hits) / len(hits)
    result["per_task"] = {k: sum(v) / len(v) for k, v in sorted(by_task.items())}
    return result


def evaluate_chat(model, tokenizer, records: list[dict], batch_size: int = 32, max_new_tokens: int | None = None,
                  responses: list | None = None, *, progress: bool = False, compile: bool = False) -> dict:
    """Greedy answers to chat-formatted held-out questions: {"chat_exact_match" (the answer's value is right),
    "chat_response_match" (the whole response is right, a full answer's justification included),
    "preferred_style_rate", "chat_contains" (the record's "answer" appears in the response, case and whitespace
    aside: for a model that answers in sentences)}, and the same for each language apart ({"en": {...}, "zh": {...}},
    from the records' "lang").

    A record holds `messages` (the conversation up to the question), `answers` (the accepted forms, one per
    style) and `preferred` (the style the preference pairs favour). A `responses` list, when given, receives
    one {"question", "response", "correct", "exact_response", "style", "answers"} per record. `progress`
    shows progress on stderr; `compile` decodes through compiled graphs."""
    from astrai_ds.data.chat import render_chat
    from astrai_ds.inference.scoring import answer_style, chat_answer_correct, chat_contains, chat_response_exact

    model.eval()
    prompts = [render_chat(tokenizer, prompt_messages(r), add_generation_prompt=True)[0] for r in records]
    if max_new_tokens is None:  # room for the longest accepted answer, and a little more
        forms = [form for r in records for form in (*r["answers"].values(), *r.get("full_forms", ()))]
        max_new_tokens = max(len(ids) for ids in tokenizer.encode_batch(forms)) + 4
    stop = set(tokenizer.stop_ids)
    correct, exact, preferred, contains = [], [], [], []
    outs = _greedy(model, tokenizer, prompts, max_new_tokens, stop, batch_size, "eval chat", progress, compile)
    for record, out in zip(records, outs):
        response = tokenizer.decode(out)
        style = answer_style(response, record)
        correct.append(chat_answer_correct(response, record))
        exact.append(chat_response_exact(response, record))
        preferred.append(style == record.get("preferred"))
        contains.append(chat_contains(response, record))
        if responses is not None:
            responses.append({"question": prompt_messages(record)[-1]["content"], "response": response,
                              "correct": correct[-1], "contains": contains[-1],
                              "exact_response": exact[-1], "style": style, "answers": record.get("answers")})

    def scores(rows: list[int]) -> dict:
        return {"chat_exact_match": sum(correct[i] for i in rows) / len(rows),
                "chat_response_match": sum(exact[i] for i in rows) / len(rows),
                "preferred_style_rate": sum(preferred[i] for i in rows) / len(rows),
                "chat_contains": sum(contains[i] for i in rows) / len(rows), "n_chat": len(rows)}

    result = scores(range(len(records)))
    for lang in sorted({r["lang"] for r in records if isinstance(r.get("lang"), str)}):
        result[lang] = scores([i for i, r in enumerate(records) if r.get("lang") == lang])
    return result


def evaluate_pairs(model, tokenizer, records: list[dict], *, progress: bool = False) -> dict:
    """{"pref_accuracy"}: the share of held-out pairs where the model gives the chosen response a higher
    log-prob than the rejected one (each response scored with its closing end-of-turn token, <|im_end|> in
    ours); `progress` shows progress on stderr."""
    from astrai_ds.data.chat import render_response
    model.eval()
    wins = []
    for i in _batches(len(records), 1, "eval pairs", "pair", progress):
        record = records[i]
        logprobs = []
        for response in (record["chosen"], record["rejected"]):
            ids, mask = render_response(tokenizer, prompt_messages(record), response)
            start = mask.index(1) if 1 in mask else len(ids)
            logprobs.append(sequence_logprob(model, ids[:start], ids[start:]))
        wins.append(logprobs[0] > logprobs[1])
    return {"pref_accuracy": sum(wins) / len(wins), "n_pairs": len(records)}


@torch.no_grad()
def sequence_logprob(model, prompt: list[int], completion: list[int]) -> float:
    """Sum over the completion tokens of log p(token | prompt and the completion before it).

    The whole sequence must fit in model.cfg.max_seq_len (cropping would change what is scored).
    """
    if not prompt:
        raise ValueError("sequence_logprob: the prompt needs at least one token (e.g. a BOS id)")
    if not completion:
        return 0.0
    ids = list(prompt) + list(completion)
    if len(ids) > model.cfg.max_seq_len:
        raise ValueError(f"sequence_logprob: prompt + completion is {len(ids)} tokens, more than "
                         f"max_seq_len={model.cfg.max_seq_len}")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    logits = model(input_ids)[0, len(prompt) - 1:-1].float()  # (len(completion), vocab): predicts completion
    targets = input_ids[0, len(prompt):]  # (len(completion),)
    return float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum())
