"""Scoring chat responses to the built-in corpus's held-out questions (`sft_eval.jsonl` records): the style
of a response, whether its value is right, whether the whole response is right."""

from __future__ import annotations

import re

from astrai_ds.data.corpus import JUSTIFY, STYLES


def normalise(text: str) -> str:
    """Lower case, runs of whitespace as one space, no space at either end."""
    return re.sub(r"\s+", " ", text).strip().lower()


def answer_contained(response: str, answer: str) -> bool:
    """Whether `answer` appears anywhere in `response`, case and runs of whitespace aside: the measure for a model
    that answers in sentences ("The Mimo Max came out in 2012.")."""
    answer = normalise(answer)
    return bool(answer) and answer in normalise(response)


def _full_forms(record: dict) -> list[str]:
    return record.get("full_forms") or [record["answers"]["full"]]


def _is_value(text: str, plain: str) -> bool:
    """One word without a sentence end, not much longer than the plain answer: a bare value, right or wrong."""
    return (bool(text) and not any(c.isspace() for c in text) and not text.endswith((".", "。"))
            and len(text) <= 2 * len(plain) + 4)


def _value_and_justification(response: str, record: dict) -> tuple[str, str]:
    """(value, justification) of a response: the text before the first value/statement joiner of the
    record's language and the text after it ("" when there is no joiner)."""
    head, sep, tail = response.strip().partition(JUSTIFY[record.get("lang", "en")])
    return (head, tail) if sep else (response.strip(), "")


def answer_style(response: str, record: dict) -> str:
    """"full", "plain" or "other": the style of a response to an sft_eval record, right or wrong.

    full: a value, then a justification: one sentence ending in a full stop ("69. 23 + 45 = 69." and
    "68. 23 + 46 = 68." are full);
    plain: a bare value, i.e. one word without a sentence end, not much longer than the plain answer;
    other: anything else (an empty answer, a sentence without the value first, a value with a unit)."""
    plain = record["answers"]["plain"]
    value, justification = _value_and_justification(response, record)
    if not _is_value(value, plain):
        return "other"
    if not justification:
        return "plain"
    one_sentence = justification.endswith((".", "。")) and sum(map(justification.count, ".。")) == 1
    return "full" if one_sentence else "other"


def chat_answer_correct(response: str, record: dict) -> bool:
    """The answer is right: the response is the plain value alone, or that value followed by a justification
    (in the full style). The justification itself is scored by `chat_response_exact`."""
    value, _ = _value_and_justification(response, record)
    return value == record["answers"]["plain"] and answer_style(response, record) in STYLES


def chat_contains(response: str, record: dict) -> bool:
    """The record's "answer" appears anywhere in the response, case and whitespace aside (`answer_contained`); for a
    record without a string "answer", the value is right (`chat_answer_correct`). What chat_contains counts."""
    answer = record.get("answer")
    return answer_contained(response, answer) if isinstance(answer, str) else chat_answer_correct(response, record)


def chat_response_exact(response: str, record: dict) -> bool:
    """The whole response is right: exactly the plain value, or exactly one of the full answers (the value,
    then a correct statement of the fact in any phrasing of the question's language)."""
    return response.strip() in (record["answers"]["plain"], *_full_forms(record))

