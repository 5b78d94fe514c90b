"""The fact registry: every task of `TASKS` generates every rendering of its facts as `Fact` records.

One fact (e.g. 23 + 45) has several renderings, 2-3 phrasings in each language, each with plausible wrong
answers. A task says how `split` holds it out ("fact" for open sets, "rendering" for closed sets) and how many
pretraining sentences it contributes at scale 1.0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterator

from astrai_ds.data.corpus.words import (ANTONYMS, MONTH_DAYS, MONTHS_EN, MONTHS_ZH, UNITS, WEEKDAYS_EN, WEEKDAYS_ZH,
                                         WORDS)

LANGS = ("en", "zh")
SEP = {"en": " ", "zh": ""}  # between prompt and answer
END = {"en": ".", "zh": "。"}  # after the answer


@dataclass(frozen=True, slots=True)
class Fact:
    """One rendering of one fact: `prompt` + separator + `answer` + terminator is a training sentence."""

    task: str  # registry name, e.g. "add"
    lang: str  # "en" or "zh": the language of the template
    key: tuple  # identity of the underlying fact, shared by all its phrasings in both languages
    phrasing: str  # the prompt template this rendering came from
    prompt: str  # never ends with a space
    answer: str
    distractors: tuple[str, ...]  # plausible wrong answers in the same format as `answer`
    values: tuple = ()  # the template values as (name, value) pairs: other phrasings of the same fact

    def render(self, answer: str | None = None) -> str:
        """The full sentence, with `answer` (for example a wrong one) in place of the correct answer."""
        return self.prompt + SEP[self.lang] + (self.answer if answer is None else answer) + END[self.lang]

    @property
    def text(self) -> str:
        return self.render()

    def wrong_answer(self, rng) -> str:
        """A plausible wrong answer (off by one, the other operand, a neighbouring day...). `rng` is a
        `random.Random` (a numpy Generator works too)."""
        return str(rng.choice(self.distractors))

    def eval_record(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "text": self.text, "lang": self.lang, "task": self.task}


@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable[[], Iterator[Fact]]  # every rendering of every fact, in a fixed order
    holdout: str  # "fact": hold out whole facts; "rendering": hold out single phrasing/language renderings
    pretrain_records: int  # sentences in pretrain.jsonl at scale 1.0


TASKS: dict[str, Task] = {}


def register(name: str, holdout: str, pretrain_records: int):
    """Add a task generator to `TASKS`; the registry's order is the corpus's order before shuffling."""
    if holdout not in ("fact", "rendering"):
        raise ValueError(f"task {name!r}: holdout must be 'fact' or 'rendering', got {holdout!r}")

    def wrap(fn):
        TASKS[name] = Task(name, fn, holdout, pretrain_records)
        return fn

    return wrap


def _render(task: str, key: tuple, templates: list[tuple[str, str, str]], values: dict, wrong: dict) -> Iterator[Fact]:
    """Facts for templates [(lang, prompt format, answer format)]. `wrong` maps value names to parallel lists
    of wrong values: distractor i formats the answer with every such name replaced by its i-th wrong value."""
    n_wrong = len(next(iter(wrong.values())))
    by_format: dict[str, tuple[str, tuple[str, ...]]] = {}  # templates share answer formats: format once
    for lang, prompt_fmt, answer_fmt in templates:
        if answer_fmt not in by_format:
            answer = answer_fmt.format(**values)
            distractors = []
            for i in range(n_wrong):
                d = answer_fmt.format(**{**values, **{k: v[i] for k, v in wrong.items()}})
                if d != answer and d not in distractors:
                    distractors.append(d)
            by_format[answer_fmt] = (answer, tuple(distractors))
        answer, distractors = by_format[answer_fmt]
        yield Fact(task, lang, key, prompt_fmt, prompt_fmt.format(**values), answer, distractors,
                   tuple(values.items()))


# ---------------------------------------------------------------- arithmetic and comparison (open sets)

ADD = [
    ("en", "{a} + {b} =", "{s}"),
    ("en", "{a} plus {b} equals", "{s}"),
    ("en", "The sum of {a} and {b} is", "{s}"),
    ("zh", "{a}加{b}等于", "{s}"),
    ("zh", "{a}+{b}=", "{s}"),
    ("zh", "{a}与{b}的和是", "{s}"),
]
SUB = [
    ("en", "{a} - {b} =", "{d}"),
    ("en", "{a} minus {b} equals", "{d}"),
    ("en", "The difference between {a} and {b} is", "{d}"),
    ("zh", "{a}减{b}等于", "{d}"),
    ("zh", "{a}-{b}=", "{d}"),
    ("zh", "{a}与{b}的差是", "{d}"),
]
LARGER = [
    ("en", "The larger of {a} and {b} is", "{x}"),
    ("en", "Which is larger, {a} or {b}?", "{x}"),
    ("zh", "{a}和{b}中较大的是", "{x}"),
    ("zh", "{a}和{b}哪个大？", "{x}"),
]
SMALLER = [
    ("en", "The smaller of {a} and {b} is", "{x}"),
    ("zh", "{a}和{b}中较小的是", "{x}"),
]


def _near(n: int, steps=(1, -1, 10, -10)) -> list[int]:
    return [n + s for s in steps if n + s >= 0]


@register("add", holdout="fact", pretrain_records=10_000)
def _add() -> Iterator[Fact]:
    # The fact is the unordered pair: 23 + 45 and 45 + 23 are held out together.
    for lo in range(100):
        for hi in range(lo, 100):
            for a, b in ((lo, hi), (hi, lo)) if lo != hi else ((lo, hi),):
                s = a + b
                yield from _render("add", (lo, hi), ADD, {"a": a, "b": b, "s": s}, {"s": _near(s)})


@register("sub", holdout="fact", pretrain_records=8_000)
def _sub() -> Iterator[Fact]:
    for a in range(100):
        for b in range(a + 1):  # results stay non-negative
            d = a - b
            yield from _render("sub", (a, b), SUB, {"a": a, "b": b, "d": d}, {"d": _near(d) + [a + b]})


@register("compare", holdout="fact", pretrain_records=6_000)
def _compare() -> Iterator[Fact]:
    # The fact is the unordered pair: both orders and both "larger" and "smaller" are held out together.
    for lo in range(100):
        for hi in range(lo + 1, 100):
            for a, b in ((lo, hi), (hi, lo)):
                yield from _render("compare", (lo, hi), LARGER, {"a": a, "b": b, "x": hi}, {"x": [lo]})
                yield from _render("compare", (lo, hi), SMALLER, {"a": a, "b": b, "x": lo}, {"x": [hi]})


# ---------------------------------------------------------------- unit conversions (open set)

CONVERT = [
    ("en", "{v} {fa} =", "{out} {ta}"),
    ("en", "{v} {fw} is", "{out} {tw}"),
    ("en", "How many {tw} are in {v} {fa}?", "{out}"),
    ("zh", "{v}{fz}等于", "{out}{tz}"),
    ("zh", "{v}{fz}是", "{out}{tz}"),
    ("zh", "{v}{fz}等于多少{tz}？", "{out}{tz}"),
]


@register("convert", holdout="fact", pretrain_records=5_000)
def _convert() -> Iterator[Fact]:
    for unit, (factor, wrong_factor, fa, ta, f1, fn, tw, fz, tz) in UNITS.items():
        for v in range(1, 101):
            out = v * factor
            values = {"v": v, "out": out, "fa": fa, "ta": ta, "fw": f1 if v == 1 else fn, "tw": tw, "fz": fz, "tz": tz}
            wrong = [w for w in (out // 10, out * 10, v * wrong_factor) if w > 0]
            yield from _render("convert", (v, unit), CONVERT, values, {"out": wrong})


# ---------------------------------------------------------------- dates (closed sets)

DAY_AFTER = [
    ("en", "The day after {d_en} is", "{x_en}"),
    ("en", "If today is {d_en}, tomorrow is", "{x_en}"),
    ("en", "What day comes after {d_en}?", "{x_en}"),
    ("zh", "{d_zh}的后一天是", "{x_zh}"),
    ("zh", "如果今天是{d_zh}，明天是", "{x_zh}"),
    ("zh", "{d_zh}之后的一天是", "{x_zh}"),
]
DAY_BEFORE = [
    ("en", "The day before {d_en} is", "{x_en}"),
    ("en", "If today is {d_en}, yesterday was", "{x_en}"),
    ("en", "What day comes before {d_en}?", "{x_en}"),
    ("zh", "{d_zh}的前一天是", "{x_zh}"),
    ("zh", "如果今天是{d_zh}，昨天是", "{x_zh}"),
    ("zh", "{d_zh}之前的一天是", "{x_zh}"),
]
MONTH_AFTER = [
    ("en", "The month after {d_en} is", "{x_en}"),
    ("en", "After {d_en} comes", "{x_en}"),
    ("en", "What month comes after {d_en}?", "{x_en}"),
    ("zh", "{d_zh}的下一个月是", "{x_zh}"),
    ("zh", "{d_zh}之后是", "{x_zh}"),
    ("zh", "{d_zh}过后的月份是", "{x_zh}"),
]
MONTH_BEFORE = [
    ("en", "The month before {d_en} is", "{x_en}"),
    ("en", "Before {d_en} comes", "{x_en}"),
    ("en", "What month comes before {d_en}?", "{x_en}"),
    ("zh", "{d_zh}的上一个月是", "{x_zh}"),
    ("zh", "{d_zh}之前是", "{x_zh}"),
    ("zh", "{d_zh}前面的月份是", "{x_zh}"),
]
MONTH_LENGTH = [
    ("en", "{d_en} has", "{n} days"),
    ("en", "In a common year, {d_en} has", "{n} days"),
    ("en", "How many days are in {d_en}?", "{n}"),
    ("zh", "{d_zh}有", "{n}天"),
    ("zh", "平年的{d_zh}有", "{n}天"),
    ("zh", "{d_zh}有多少天？", "{n}天"),
]


def _cyclic(task: str, names_en: list, names_zh: list, after: list, before: list) -> Iterator[Fact]:
    """Successor and predecessor facts on a cycle (weekdays, months)."""
    n = len(names_en)
    for templates, step, kind in ((after, 1, "after"), (before, -1, "before")):
        for i in range(n):
            j = (i + step) % n
            wrong_idx = [i, (i - step) % n, (i + 2 * step) % n]  # the same day, the wrong direction, one too far
            values = {"d_en": names_en[i], "d_zh": names_zh[i], "x_en": names_en[j], "x_zh": names_zh[j]}
            wrong = {"x_en": [names_en[k] for k in wrong_idx], "x_zh": [names_zh[k] for k in wrong_idx]}
            yield from _render(task, (kind, i), templates, values, wrong)


@register("weekday", holdout="rendering", pretrain_records=1_000)
def _weekday() -> Iterator[Fact]:
    yield from _cyclic("weekday", WEEKDAYS_EN, WEEKDAYS_ZH, DAY_AFTER, DAY_BEFORE)


@register("month", holdout="rendering", pretrain_records=1_200)
def _month() -> Iterator[Fact]:
    yield from _cyclic("month", MONTHS_EN, MONTHS_ZH, MONTH_AFTER, MONTH_BEFORE)


@register("month_days", holdout="rendering", pretrain_records=800)
def _month_days() -> Iterator[Fact]:
    for i, n in enumerate(MONTH_DAYS):
        values = {"d_en": MONTHS_EN[i], "d_zh": MONTHS_ZH[i], "n": n}
        yield from _render("month_days", (i,), MONTH_LENGTH, values, {"n": [28, 29, 30, 31]})


# ---------------------------------------------------------------- word facts (closed sets)

LETTER_COUNT = [
    ("en", "The word {w} has", "{n} letters"),
    ("en", "How many letters are in {w}?", "{n}"),
    ("en", "Spelled out, {w} has", "{n} letters"),
    ("zh", "单词{w}有", "{n}个字母"),
    ("zh", "{w}有几个字母？", "{n}个"),
    ("zh", "英文单词{w}的字母数是", "{n}"),
]
FIRST_LETTER = [
    ("en", "The first letter of {w} is", "{c}"),
    ("en", "{w} starts with the letter", "{c}"),
    ("en", "The word {w} begins with", "{c}"),
    ("zh", "{w}的第一个字母是", "{c}"),
    ("zh", "{w}的首字母是", "{c}"),
    ("zh", "单词{w}开头的字母是", "{c}"),
]
OPPOSITE = [
    ("en", "The opposite of {x_en} is", "{y_en}"),
    ("en", "The antonym of {x_en} is", "{y_en}"),
    ("zh", "{x_zh}的反义词是", "{y_zh}"),
    ("zh", "与{x_zh}意思相反的词是", "{y_zh}"),
]
EN_TO_ZH = [
    ("en", "The Chinese for {en} is", "{zh}"),
    ("en", "In Chinese, {en} is", "{zh}"),
    ("zh", "{en}的中文是", "{zh}"),
    ("zh", "{en}用中文说是", "{zh}"),
]
ZH_TO_EN = [
    ("en", "The English for {zh} is", "{en}"),
    ("en", "In English, {zh} is", "{en}"),
    ("zh", "{zh}的英文是", "{en}"),
    ("zh", "{zh}用英文说是", "{en}"),
]


@register("letters", holdout="rendering", pretrain_records=3_000)
def _letters() -> Iterator[Fact]:
    for w, _ in WORDS:
        n = len(w)
        yield from _render("letters", (w,), LETTER_COUNT, {"w": w, "n": n}, {"n": [n - 1, n + 1, n + 2]})


@register("first_letter", holdout="rendering", pretrain_records=3_000)
def _first_letter() -> Iterator[Fact]:
    for w, _ in WORDS:
        # The other letters of the word, then its neighbours in the alphabet.
        wrong = [c for c in w[1:] if c != w[0]] + [chr((ord(w[0]) - 97 + k) % 26 + 97) for k in (1, -1)]
        yield from _render("first_letter", (w,), FIRST_LETTER, {"w": w, "c": w[0]}, {"c": wrong})


@register("antonym", holdout="rendering", pretrain_records=3_000)
def _antonym() -> Iterator[Fact]:
    n = len(ANTONYMS)
    for i, (a_zh, b_zh, a_en, b_en) in enumerate(ANTONYMS):
        others = [ANTONYMS[(i + k) % n] for k in (1, 2, 3)]  # words from other pairs
        for x_zh, y_zh, x_en, y_en, col in ((a_zh, b_zh, a_en, b_en, 1), (b_zh, a_zh, b_en, a_en, 0)):
            wrong = {"y_zh": [x_zh] + [o[col] for o in others], "y_en": [x_en] + [o[col + 2] for o in others]}
            values = {"x_zh": x_zh, "y_zh": y_zh, "x_en": x_en, "y_en": y_en}
            # The pair is the fact: 大 -> 小 and 小 -> 大 share a key.
            yield from _render("antonym", (a_en, b_en), OPPOSITE, values, wrong)


@register("translate", holdout="rendering", pretrain_records=4_000)
def _translate() -> Iterator[Fact]:
    n = len(WORDS)
    for i, (en, zh) in enumerate(WORDS):
        others = [WORDS[(i + k) % n] for k in (1, 2, 3)]
        values = {"en": en, "zh": zh}
        yield from _render("translate", (en,), EN_TO_ZH, values, {"zh": [o[1] for o in others]})
        yield from _render("translate", (en,), ZH_TO_EN, values, {"en": [o[0] for o in others]})


@functools.cache
def task_facts(name: str) -> tuple[Fact, ...]:
    """Every rendering of every fact of one task, in a fixed order (cached: the facts never change)."""
    return tuple(TASKS[name].generate())
