"""The built-in bilingual corpus: short, verifiable facts in English and Chinese, generated from a seed.

No download. A small registry of tasks (`TASKS`) each generates every rendering of its facts as `Fact`
records: one fact (e.g. 23 + 45) has several renderings, 2-3 phrasings in each language. A seeded split
holds some of them out of training for evaluation:

- open-set tasks (arithmetic, comparison, unit conversion) hold out whole facts, by identity (the operand
  pair, the value and unit): a held-out fact appears in no phrasing and no language of the training text,
  so the eval measures generalisation (copying the larger number, appending zeros, adding digits);
- closed-set tasks (weekdays, months, word facts) cannot hold out a fact without making it unlearnable, so
  they hold out one phrasing in one language of some facts; the fact itself stays in training in the other
  phrasings, and the eval measures transfer across phrasing and language.

`write_corpus` renders the training facts as `pretrain.jsonl` and the held-out prompts as
`pretrain_eval.jsonl`, and the same split as chat data: SFT conversations and DPO pairs from training
renderings (`sft.jsonl`, `dpo.jsonl`), their evaluation sets from held-out ones (`sft_eval.jsonl`,
`dpo_eval.jsonl`). In chat form every rendering becomes a question (`QUESTIONS`), answered in one of two
styles: "plain", the bare value ("68", "星期二"), or "full", the value followed by a sentence that states
the fact as its justification ("68. 23 + 45 = 68.", "68。23加45等于68。"). SFT answers take either style
with probability 1/2, so SFT teaches no preference between them; every DPO pair prefers the full style with
the correct value, against the plain style (correct value) or a plausible wrong value (full style). Both
styles start with the value, so a pair of the two styles differs only after it: DPO learns to go on with a
justification, not to move away from the value. After SFT the preferred style is a coin flip, after DPO it
should not be: `answer_style` measures it.
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from astrai_ds.errors import DataError

LANGS = ("en", "zh")
SEP = {"en": " ", "zh": ""}  # between prompt and answer
END = {"en": ".", "zh": "。"}  # after the answer
EVAL_PER_TASK_LANG = 15  # held-out eval items per (task, language); closed sets may have fewer
PRETRAIN_FILE = "pretrain.jsonl"
EVAL_FILE = "pretrain_eval.jsonl"
SFT_FILE = "sft.jsonl"
SFT_EVAL_FILE = "sft_eval.jsonl"
DPO_FILE = "dpo.jsonl"
DPO_EVAL_FILE = "dpo_eval.jsonl"
SFT_CONVERSATIONS = 8_000  # SFT conversations at scale 1.0, split evenly over tasks and languages
DPO_PAIRS = 4_000  # DPO pairs at scale 1.0, split evenly over tasks and languages


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
    assert holdout in ("fact", "rendering"), holdout

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
            assert distractors, (task, key, prompt_fmt)
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

# name: (factor, wrong factor, en from abbr, en to abbr, en from singular, en from plural, en to plural, zh from, zh to)
UNITS = {
    "km_m": (1000, 100, "km", "m", "kilometer", "kilometers", "meters", "千米", "米"),
    "kg_g": (1000, 100, "kg", "g", "kilogram", "kilograms", "grams", "千克", "克"),
    "m_cm": (100, 1000, "m", "cm", "meter", "meters", "centimeters", "米", "厘米"),
    "h_min": (60, 100, "h", "min", "hour", "hours", "minutes", "小时", "分钟"),
    "min_s": (60, 100, "min", "s", "minute", "minutes", "seconds", "分钟", "秒"),
}
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

WEEKDAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WEEKDAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
MONTHS_EN = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
             "October", "November", "December"]
MONTHS_ZH = ["一月", "二月", "三月", "四月", "五月", "六月", "七月", "八月", "九月", "十月", "十一月", "十二月"]
MONTH_DAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # a common (non-leap) year

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

# English word, its Chinese translation: both columns unique, so every fact has one answer.
WORDS = [
    ("apple", "苹果"), ("banana", "香蕉"), ("orange", "橙子"), ("grape", "葡萄"), ("pear", "梨"),
    ("peach", "桃子"), ("watermelon", "西瓜"), ("strawberry", "草莓"), ("lemon", "柠檬"), ("rice", "米饭"),
    ("bread", "面包"), ("noodle", "面条"), ("egg", "鸡蛋"), ("milk", "牛奶"), ("water", "水"),
    ("tea", "茶"), ("coffee", "咖啡"), ("sugar", "糖"), ("salt", "盐"), ("meat", "肉"),
    ("fish", "鱼"), ("chicken", "鸡"), ("duck", "鸭子"), ("cat", "猫"), ("dog", "狗"),
    ("horse", "马"), ("cow", "奶牛"), ("sheep", "羊"), ("pig", "猪"), ("bird", "鸟"),
    ("tiger", "老虎"), ("lion", "狮子"), ("elephant", "大象"), ("monkey", "猴子"), ("rabbit", "兔子"),
    ("panda", "熊猫"), ("bear", "熊"), ("snake", "蛇"), ("mouse", "老鼠"), ("wolf", "狼"),
    ("sun", "太阳"), ("moon", "月亮"), ("star", "星星"), ("sky", "天空"), ("cloud", "云"),
    ("rain", "雨"), ("snow", "雪"), ("wind", "风"), ("river", "河"), ("mountain", "山"),
    ("sea", "海"), ("lake", "湖"), ("tree", "树"), ("flower", "花"), ("grass", "草"),
    ("forest", "森林"), ("stone", "石头"), ("fire", "火"), ("book", "书"), ("pen", "笔"),
    ("paper", "纸"), ("desk", "书桌"), ("chair", "椅子"), ("door", "门"), ("window", "窗户"),
    ("house", "房子"), ("school", "学校"), ("teacher", "老师"), ("student", "学生"), ("doctor", "医生"),
    ("friend", "朋友"), ("mother", "母亲"), ("father", "父亲"), ("brother", "兄弟"), ("sister", "姐妹"),
    ("child", "孩子"), ("city", "城市"), ("road", "路"), ("car", "汽车"), ("bus", "公共汽车"),
    ("train", "火车"), ("plane", "飞机"), ("boat", "船"), ("bicycle", "自行车"), ("computer", "电脑"),
    ("phone", "电话"), ("clock", "钟"), ("money", "钱"), ("music", "音乐"), ("picture", "图画"),
    ("hand", "手"), ("head", "头"), ("eye", "眼睛"), ("ear", "耳朵"), ("mouth", "嘴"),
    ("nose", "鼻子"), ("foot", "脚"), ("heart", "心"), ("red", "红色"), ("blue", "蓝色"),
    ("green", "绿色"), ("yellow", "黄色"), ("white", "白色"), ("black", "黑色"), ("spring", "春天"),
    ("summer", "夏天"), ("autumn", "秋天"), ("winter", "冬天"), ("morning", "早上"), ("night", "夜晚"),
    ("today", "今天"), ("tomorrow", "明天"), ("yesterday", "昨天"), ("name", "名字"), ("language", "语言"),
    ("country", "国家"), ("world", "世界"), ("family", "家庭"), ("food", "食物"), ("kitchen", "厨房"),
    ("garden", "花园"), ("shop", "商店"), ("hospital", "医院"), ("library", "图书馆"), ("park", "公园"),
    ("bridge", "桥"), ("island", "岛"), ("ocean", "海洋"), ("key", "钥匙"), ("box", "盒子"),
    ("cup", "杯子"), ("bowl", "碗"), ("spoon", "勺子"), ("shoe", "鞋"), ("hat", "帽子"),
    ("shirt", "衬衫"), ("bed", "床"), ("table", "桌子"), ("king", "国王"), ("queen", "王后"),
]

# Chinese antonym pair, English antonym pair: every word unique within its language, so "the opposite of
# X" has one answer.
ANTONYMS = [
    ("大", "小", "big", "small"), ("多", "少", "many", "few"), ("高", "低", "high", "low"),
    ("长", "短", "long", "short"), ("快", "慢", "fast", "slow"), ("上", "下", "up", "down"),
    ("左", "右", "left", "right"), ("前", "后", "front", "back"), ("冷", "热", "cold", "hot"),
    ("黑", "白", "black", "white"), ("新", "旧", "new", "old"), ("好", "坏", "good", "bad"),
    ("开", "关", "open", "close"), ("早", "晚", "early", "late"), ("远", "近", "far", "near"),
    ("轻", "重", "light", "heavy"), ("胖", "瘦", "fat", "thin"), ("深", "浅", "deep", "shallow"),
    ("买", "卖", "buy", "sell"), ("来", "去", "come", "go"), ("哭", "笑", "cry", "laugh"),
    ("真", "假", "true", "false"), ("对", "错", "correct", "wrong"), ("进", "出", "in", "out"),
    ("东", "西", "east", "west"), ("南", "北", "south", "north"), ("男", "女", "male", "female"),
    ("干", "湿", "dry", "wet"), ("强", "弱", "strong", "weak"), ("难", "易", "difficult", "easy"),
    ("美", "丑", "beautiful", "ugly"), ("甜", "苦", "sweet", "bitter"), ("宽", "窄", "wide", "narrow"),
    ("亮", "暗", "bright", "dark"), ("忙", "闲", "busy", "idle"), ("胜", "负", "win", "lose"),
    ("开始", "结束", "begin", "end"), ("增加", "减少", "increase", "decrease"),
    ("成功", "失败", "success", "failure"), ("快乐", "悲伤", "happy", "sad"),
    ("安全", "危险", "safe", "dangerous"), ("干净", "肮脏", "clean", "dirty"), ("富", "穷", "rich", "poor"),
    ("硬", "软", "hard", "soft"), ("内", "外", "inside", "outside"), ("推", "拉", "push", "pull"),
    ("爱", "恨", "love", "hate"), ("日", "夜", "day", "night"), ("睡", "醒", "sleep", "wake"),
    ("问", "答", "ask", "answer"), ("聪明", "愚蠢", "clever", "stupid"), ("古", "今", "ancient", "modern"),
]

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


def _check_word_lists() -> None:
    assert len({w for w, _ in WORDS}) == len(WORDS) and len({z for _, z in WORDS}) == len(WORDS)
    assert all(w.isascii() and w.isalpha() and w.islower() for w, _ in WORDS)
    en = [w for p in ANTONYMS for w in p[2:]]
    zh = [w for p in ANTONYMS for w in p[:2]]
    assert len(set(en)) == len(en) and len(set(zh)) == len(zh)


_check_word_lists()


# ---------------------------------------------------------------- split and files


@functools.cache
def task_facts(name: str) -> tuple[Fact, ...]:
    """Every rendering of every fact of one task, in a fixed order (cached: the facts never change)."""
    return tuple(TASKS[name].generate())


@dataclass(frozen=True)
class FactSplit:
    train: tuple[Fact, ...]  # renderings that training data may use
    eval: tuple[Fact, ...]  # held-out renderings used as evaluation prompts
    heldout: tuple[Fact, ...]  # every rendering kept out of training (a superset of `eval`)


def _by_key(facts) -> dict[tuple, list[Fact]]:
    groups: dict[tuple, list[Fact]] = {}
    for f in facts:
        groups.setdefault(f.key, []).append(f)
    return groups


def _split_task(task: Task, rng: random.Random, per_lang: int) -> tuple[list[Fact], list[Fact], list[Fact]]:
    facts = task_facts(task.name)
    groups = _by_key(facts)
    keys = list(groups)
    rng.shuffle(keys)
    evals: list[Fact] = []
    if task.holdout == "fact":
        # Key i goes to English for the first `per_lang` keys, Chinese for the next; all its renderings leave.
        chosen = keys[: per_lang * len(LANGS)]
        for i, key in enumerate(chosen):
            lang = LANGS[i // per_lang]
            evals.append(rng.choice([f for f in groups[key] if f.lang == lang]))
        out_keys = set(chosen)
        heldout = [f for f in facts if f.key in out_keys]
    else:
        # One rendering per (fact, language) at most, so each held-out fact keeps its other phrasings.
        for lang in LANGS:
            for key in keys[:per_lang]:
                evals.append(rng.choice([f for f in groups[key] if f.lang == lang]))
            rng.shuffle(keys)
        heldout = evals
    out = {id(f) for f in heldout}
    train = [f for f in facts if id(f) not in out]
    return train, evals, heldout


@functools.cache
def split_facts(seed: int = 0, per_lang: int = EVAL_PER_TASK_LANG) -> FactSplit:
    """The seeded train / held-out split over all tasks (independent of the corpus scale)."""
    train, evals, heldout = [], [], []
    for name, task in TASKS.items():
        t, e, h = _split_task(task, random.Random(f"split:{seed}:{name}"), per_lang)
        train += t
        evals += e
        heldout += h
    return FactSplit(tuple(train), tuple(evals), tuple(heldout))


def _sample(train: list[Fact], n: int, rng: random.Random) -> list[Fact]:
    """`n` renderings spread evenly over facts: round r takes each fact's r-th rendering (in a shuffled
    order, cycling when a fact runs out), so every fact appears n // facts or one more times."""
    groups = _by_key(train)
    keys = list(groups)
    rng.shuffle(keys)
    for key in keys:
        rng.shuffle(groups[key])
    out: list[Fact] = []
    r = 0
    while len(out) < n:
        for key in keys:
            group = groups[key]
            out.append(group[r % len(group)])
            if len(out) == n:
                break
        r += 1
    return out


def _write_lines(path: Path, records) -> int:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path.stat().st_size


# ---------------------------------------------------------------- chat forms: SFT conversations and DPO pairs

# The question form of every phrasing. A statement ("23 + 45 =") gets a question of its own; a phrasing that
# is already a question stays as it is. One question per phrasing keeps the held-out split intact: the
# question of a held-out rendering is asked in no training conversation.
QUESTIONS = {
    "{a} + {b} =": "What is {a} + {b}?",
    "{a} plus {b} equals": "What does {a} plus {b} equal?",
    "The sum of {a} and {b} is": "What is the sum of {a} and {b}?",
    "{a}加{b}等于": "{a}加{b}等于多少？",
    "{a}+{b}=": "{a}+{b}等于几？",
    "{a}与{b}的和是": "{a}与{b}的和是多少？",
    "{a} - {b} =": "What is {a} - {b}?",
    "{a} minus {b} equals": "What does {a} minus {b} equal?",
    "The difference between {a} and {b} is": "What is the difference between {a} and {b}?",
    "{a}减{b}等于": "{a}减{b}等于多少？",
    "{a}-{b}=": "{a}-{b}等于几？",
    "{a}与{b}的差是": "{a}与{b}的差是多少？",
    "The larger of {a} and {b} is": "What is the larger of {a} and {b}?",
    "{a}和{b}中较大的是": "{a}和{b}中较大的是哪个？",
    "The smaller of {a} and {b} is": "Which is smaller, {a} or {b}?",
    "{a}和{b}中较小的是": "{a}和{b}哪个小？",
    "{v} {fa} =": "What is {v} {fa} in {ta}?",
    "{v} {fw} is": "How many {tw} is {v} {fw}?",
    "{v}{fz}等于": "{v}{fz}换算成{tz}是多少？",
    "{v}{fz}是": "{v}{fz}是多少{tz}？",
    "The day after {d_en} is": "What is the day after {d_en}?",
    "If today is {d_en}, tomorrow is": "If today is {d_en}, what day is tomorrow?",
    "{d_zh}的后一天是": "{d_zh}的后一天是星期几？",
    "如果今天是{d_zh}，明天是": "如果今天是{d_zh}，明天是星期几？",
    "{d_zh}之后的一天是": "{d_zh}之后的一天是哪天？",
    "The day before {d_en} is": "What is the day before {d_en}?",
    "If today is {d_en}, yesterday was": "If today is {d_en}, what day was yesterday?",
    "{d_zh}的前一天是": "{d_zh}的前一天是星期几？",
    "如果今天是{d_zh}，昨天是": "如果今天是{d_zh}，昨天是星期几？",
    "{d_zh}之前的一天是": "{d_zh}之前的一天是哪天？",
    "The month after {d_en} is": "What is the month after {d_en}?",
    "After {d_en} comes": "Which month follows {d_en}?",
    "{d_zh}的下一个月是": "{d_zh}的下一个月是几月？",
    "{d_zh}之后是": "{d_zh}之后是哪个月？",
    "{d_zh}过后的月份是": "{d_zh}过后的月份是什么？",
    "The month before {d_en} is": "What is the month before {d_en}?",
    "Before {d_en} comes": "Which month precedes {d_en}?",
    "{d_zh}的上一个月是": "{d_zh}的上一个月是几月？",
    "{d_zh}之前是": "{d_zh}之前是哪个月？",
    "{d_zh}前面的月份是": "{d_zh}前面的月份是什么？",
    "{d_en} has": "How many days does {d_en} have?",
    "In a common year, {d_en} has": "In a common year, how many days does {d_en} have?",
    "{d_zh}有": "{d_zh}有几天？",
    "平年的{d_zh}有": "平年的{d_zh}有多少天？",
    "The word {w} has": "How many letters does the word {w} have?",
    "Spelled out, {w} has": "Spelled out, how many letters does {w} have?",
    "单词{w}有": "单词{w}有多少个字母？",
    "英文单词{w}的字母数是": "英文单词{w}的字母数是多少？",
    "The first letter of {w} is": "What is the first letter of {w}?",
    "{w} starts with the letter": "Which letter does {w} start with?",
    "The word {w} begins with": "What letter does the word {w} begin with?",
    "{w}的第一个字母是": "{w}的第一个字母是什么？",
    "{w}的首字母是": "{w}的首字母是哪个？",
    "单词{w}开头的字母是": "单词{w}开头的字母是什么？",
    "The opposite of {x_en} is": "What is the opposite of {x_en}?",
    "The antonym of {x_en} is": "What is the antonym of {x_en}?",
    "{x_zh}的反义词是": "{x_zh}的反义词是什么？",
    "与{x_zh}意思相反的词是": "与{x_zh}意思相反的词是哪个？",
    "The Chinese for {en} is": "What is the Chinese for {en}?",
    "In Chinese, {en} is": "How do you say {en} in Chinese?",
    "{en}的中文是": "{en}的中文是什么？",
    "{en}用中文说是": "{en}用中文怎么说？",
    "The English for {zh} is": "What is the English for {zh}?",
    "In English, {zh} is": "How do you say {zh} in English?",
    "{zh}的英文是": "{zh}的英文是什么？",
    "{zh}用英文说是": "{zh}用英文怎么说？",
}

# The plain answer of each template group in each language: the bare value, without unit or sentence.
PLAIN_ANSWERS = [
    (ADD, {"en": "{s}", "zh": "{s}"}),
    (SUB, {"en": "{d}", "zh": "{d}"}),
    (LARGER, {"en": "{x}", "zh": "{x}"}),
    (SMALLER, {"en": "{x}", "zh": "{x}"}),
    (CONVERT, {"en": "{out}", "zh": "{out}"}),
    (DAY_AFTER, {"en": "{x_en}", "zh": "{x_zh}"}),
    (DAY_BEFORE, {"en": "{x_en}", "zh": "{x_zh}"}),
    (MONTH_AFTER, {"en": "{x_en}", "zh": "{x_zh}"}),
    (MONTH_BEFORE, {"en": "{x_en}", "zh": "{x_zh}"}),
    (MONTH_LENGTH, {"en": "{n}", "zh": "{n}"}),
    (LETTER_COUNT, {"en": "{n}", "zh": "{n}"}),
    (FIRST_LETTER, {"en": "{c}", "zh": "{c}"}),
    (OPPOSITE, {"en": "{y_en}", "zh": "{y_zh}"}),
    (EN_TO_ZH, {"en": "{zh}", "zh": "{zh}"}),
    (ZH_TO_EN, {"en": "{en}", "zh": "{en}"}),
]
SYSTEM_PROMPTS = {  # none of them hints at an answer style: the style must stay a coin flip in SFT
    "en": ("You are a helpful assistant.", "You answer questions about numbers, dates and words.",
           "You are a bilingual assistant for English and Chinese."),
    "zh": ("你是一个乐于助人的助手。", "你负责回答关于数字、日期和词语的问题。", "你是一个会说中文和英文的助手。"),
}
P_SYSTEM = 0.3  # share of conversations (and DPO prompts) with a system message
P_TWO_TURNS = 0.2  # share of SFT conversations with a second question and answer
STYLES = ("plain", "full")
PREFERRED_STYLE = "full"
JUSTIFY = {"en": ". ", "zh": "。"}  # between the value and the statement in a full answer


def justified(value: str, statement: str, lang: str) -> str:
    """A full-style answer: the value, then the sentence stating the fact."""
    return value + JUSTIFY[lang] + statement


def _is_question(phrasing: str) -> bool:
    return phrasing.endswith(("?", "？"))


def _chat_forms() -> dict[str, tuple[dict, tuple[str, ...]]]:
    """phrasing -> (plain answer format per language, the group's statement phrasings in that language)."""
    forms = {}
    for group, plain in PLAIN_ANSWERS:
        for lang, phrasing, _ in group:
            statements = tuple(p for lng, p, _ in group if lng == lang and not _is_question(p))
            assert statements, phrasing
            forms[phrasing] = (plain, statements)
    questions = [QUESTIONS.get(p, p) for p in forms]
    assert len(set(questions)) == len(questions), "two phrasings share a question"
    assert all(_is_question(p) or p in QUESTIONS for p in forms)
    return forms


CHAT_FORMS = _chat_forms()


@functools.cache
def _by_prompt(task: str) -> dict[str, Fact]:
    return {f.prompt: f for f in task_facts(task)}


@dataclass(frozen=True)
class ChatItem:
    """One rendering as a question with its two answers."""

    fact: Fact  # the rendering the question comes from
    question: str
    plain: str  # the bare value
    statement: Fact  # a statement of the same fact: the full answer's justification; wrong_answer() its format
    statements: tuple = ()  # every statement phrasing of the same fact in the question's language

    @property
    def full_forms(self) -> list[str]:
        """Every full answer that is right (the value, then any phrasing of the fact in the language)."""
        return [justified(self.plain, f.render(), self.fact.lang) for f in self.statements] or [self.full]

    @property
    def full(self) -> str:
        return justified(self.plain, self.statement.render(), self.fact.lang)

    def answer(self, style: str) -> str:
        return self.plain if style == "plain" else self.full

    def wrong_full(self, rng: random.Random) -> str:
        """A full answer with a plausible wrong value, in the value and in its justification alike."""
        wrong = self.statement.wrong_answer(rng)  # in the statement's format: the value, then any unit
        unit = self.statement.answer[len(self.plain):]
        value = wrong[:len(wrong) - len(unit)] if unit and wrong.endswith(unit) else wrong
        return justified(value, self.statement.render(wrong), self.fact.lang)


def chat_item(fact: Fact, heldout_prompts: frozenset = frozenset()) -> ChatItem:
    """The chat form of a rendering. The full answer is the first statement phrasing of its group (same
    language, same values) whose rendering is not held out from pretraining, so no training response
    quotes a held-out sentence; when every statement is held out (a held-out fact), the first one."""
    values = dict(fact.values)
    plain, statements = CHAT_FORMS[fact.phrasing]
    prompts = [p.format(**values) for p in statements]
    prompt = next((p for p in prompts if (fact.task, p) not in heldout_prompts), prompts[0])
    return ChatItem(fact, QUESTIONS.get(fact.phrasing, fact.phrasing).format(**values),
                    plain[fact.lang].format(**values), _by_prompt(fact.task)[prompt],
                    tuple(_by_prompt(fact.task)[p] for p in prompts))


def _system(lang: str, rng: random.Random) -> list[dict]:
    return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS[lang])}] if rng.random() < P_SYSTEM else []


def _chat_split(seed: int) -> tuple[dict[tuple[str, str], list[Fact]], frozenset]:
    """Training renderings by (task, language), and the (task, prompt) of every held-out rendering."""
    split = split_facts(seed)
    train: dict[tuple[str, str], list[Fact]] = {(t, lang): [] for t in TASKS for lang in LANGS}
    for f in split.train:
        train[f.task, f.lang].append(f)
    return train, frozenset((f.task, f.prompt) for f in split.heldout)


def _per_task_lang(total: int, scale: float) -> int:
    return max(1, round(total * scale / (len(TASKS) * len(LANGS))))


def sft_records(seed: int = 0, scale: float = 1.0) -> list[dict]:
    """SFT conversations ({"messages"}) from training renderings, shuffled: the first question of each is
    spread evenly over tasks, languages and facts; P_TWO_TURNS of them ask a second question (any task, same
    language); every conversation answers in one style, plain or full with probability 1/2."""
    train, heldout = _chat_split(seed)
    n = _per_task_lang(SFT_CONVERSATIONS, scale)
    rng = random.Random(f"sft:{seed}")
    records = []
    for (task, lang), facts in train.items():
        for fact in _sample(facts, n, random.Random(f"sft:{seed}:{task}:{lang}")):
            items = [chat_item(fact, heldout)]
            if rng.random() < P_TWO_TURNS:
                items.append(chat_item(rng.choice(train[rng.choice(list(TASKS)), lang]), heldout))
            style = rng.choice(STYLES)
            messages = _system(lang, rng)
            for item in items:
                messages += [{"role": "user", "content": item.question},
                             {"role": "assistant", "content": item.answer(style)}]
            records.append({"messages": messages})
    rng.shuffle(records)
    return records


def _pair(item: ChatItem, rng: random.Random) -> tuple[dict, str]:
    """A DPO pair: the full answer against the plain one (half the pairs) or a wrong value in full style."""
    prompt = _system(item.fact.lang, rng) + [{"role": "user", "content": item.question}]
    if rng.random() < 0.5:
        kind, rejected = "plain_correct", item.plain
    else:
        kind, rejected = "full_wrong", item.wrong_full(rng)
    return {"prompt": prompt, "chosen": item.full, "rejected": rejected}, kind


def dpo_records(seed: int = 0, scale: float = 1.0) -> list[dict]:
    """DPO pairs ({"prompt": messages, "chosen", "rejected"}) from training renderings, shuffled."""
    train, heldout = _chat_split(seed)
    n = _per_task_lang(DPO_PAIRS, scale)
    rng = random.Random(f"dpo:{seed}")
    records = []
    for (task, lang), facts in train.items():
        for fact in _sample(facts, n, random.Random(f"dpo:{seed}:{task}:{lang}")):
            records.append(_pair(chat_item(fact, heldout), rng)[0])
    rng.shuffle(records)
    return records


def sft_eval_records(seed: int = 0) -> list[dict]:
    """One question per held-out eval rendering: {"messages": [system?, user], "answer" (the plain value),
    "answers": {"plain", "full"}, "preferred": "full", "task", "lang"}."""
    split = split_facts(seed)
    heldout = frozenset((f.task, f.prompt) for f in split.heldout)
    rng = random.Random(f"sft_eval:{seed}")
    out = []
    for fact in split.eval:
        item = chat_item(fact, heldout)
        out.append({"messages": _system(fact.lang, rng) + [{"role": "user", "content": item.question}],
                    "answer": item.plain, "answers": {"plain": item.plain, "full": item.full},
                    "full_forms": item.full_forms, "preferred": PREFERRED_STYLE, "task": fact.task,
                    "lang": fact.lang})
    return out


def dpo_eval_records(seed: int = 0) -> list[dict]:
    """One pair per held-out eval rendering: the DPO record plus "task", "lang" and "rejected_kind"
    ("plain_correct" or "full_wrong")."""
    split = split_facts(seed)
    heldout = frozenset((f.task, f.prompt) for f in split.heldout)
    rng = random.Random(f"dpo_eval:{seed}")
    out = []
    for fact in split.eval:
        pair, kind = _pair(chat_item(fact, heldout), rng)
        out.append({**pair, "task": fact.task, "lang": fact.lang, "rejected_kind": kind})
    return out


def _full_forms(record: dict) -> list[str]:
    return record.get("full_forms") or [record["answers"]["full"]]


def _is_value(text: str, plain: str) -> bool:
    """One word without a sentence end, not much longer than the plain answer: a bare value, right or wrong."""
    return (bool(text) and not any(c.isspace() for c in text) and not text.endswith((".", "。"))
            and len(text) <= 2 * len(plain) + 4)


def _split(response: str, record: dict) -> tuple[str, str]:
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
    value, justification = _split(response, record)
    if not _is_value(value, plain):
        return "other"
    if not justification:
        return "plain"
    one_sentence = justification.endswith((".", "。")) and sum(map(justification.count, ".。")) == 1
    return "full" if one_sentence else "other"


def chat_answer_correct(response: str, record: dict) -> bool:
    """The answer is right: the response is the plain value alone, or that value followed by a justification
    (in the full style). The justification itself is scored by `chat_response_exact`."""
    value, _ = _split(response, record)
    return value == record["answers"]["plain"] and answer_style(response, record) in STYLES


def chat_response_exact(response: str, record: dict) -> bool:
    """The whole response is right: exactly the plain value, or exactly one of the full answers (the value,
    then a correct statement of the fact in any phrasing of the question's language)."""
    return response.strip() in (record["answers"]["plain"], *_full_forms(record))


def chat_metrics(responses: list[str], records: list[dict]) -> dict:
    """exact_match (the answer's value, either style), response_match (the whole response, justification
    included), preferred_style_rate (share of responses in the record's preferred style, right or wrong) and
    the share of each style, over sft_eval records and greedy responses."""
    n = len(records)
    if n == 0 or len(responses) != n:
        raise ValueError(f"need one response per record, got {len(responses)} responses for {n} records")
    styles = [answer_style(r, rec) for r, rec in zip(responses, records)]
    return {
        "exact_match": sum(chat_answer_correct(r, rec) for r, rec in zip(responses, records)) / n,
        "response_match": sum(chat_response_exact(r, rec) for r, rec in zip(responses, records)) / n,
        "preferred_style_rate": sum(s == rec["preferred"] for s, rec in zip(styles, records)) / n,
        "style_rates": {s: styles.count(s) / n for s in (*STYLES, "other")},
    }


def write_corpus(out_dir, seed: int = 0, scale: float = 1.0) -> dict:
    """Write under `out_dir`:

    - `pretrain.jsonl` ({"text"} per line, shuffled), `pretrain_eval.jsonl` ({"prompt", "answer", "text",
      "lang", "task"});
    - `sft.jsonl` ({"messages"}), `sft_eval.jsonl` (see `sft_eval_records`);
    - `dpo.jsonl` ({"prompt": messages, "chosen", "rejected"}), `dpo_eval.jsonl` (plus "task", "lang",
      "rejected_kind").

    The same seed gives byte-identical files; `scale` multiplies the number of training records but leaves
    the held-out split, and so the eval files, unchanged."""
    if not isinstance(scale, (int, float)) or not scale > 0:
        raise DataError(f"corpus scale must be a positive number, got {scale!r}")
    if not isinstance(seed, int) or seed < 0:
        raise DataError(f"corpus seed must be a non-negative integer, got {seed!r}")
    split = split_facts(seed)
    train_by_task: dict[str, list[Fact]] = {name: [] for name in TASKS}
    for f in split.train:
        train_by_task[f.task].append(f)
    records: list[Fact] = []
    counts: dict[str, dict] = {}
    for name, task in TASKS.items():
        n = max(1, round(task.pretrain_records * scale))
        records += _sample(train_by_task[name], n, random.Random(f"sample:{seed}:{name}"))
        counts[name] = {"pretrain": n, "eval": sum(f.task == name for f in split.eval),
                        "sft": _per_task_lang(SFT_CONVERSATIONS, scale) * len(LANGS),
                        "dpo": _per_task_lang(DPO_PAIRS, scale) * len(LANGS)}
    random.Random(f"shuffle:{seed}").shuffle(records)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pretrain_bytes = _write_lines(out / PRETRAIN_FILE, ({"text": f.text} for f in records))
    eval_bytes = _write_lines(out / EVAL_FILE, (f.eval_record() for f in split.eval))
    chat = {SFT_FILE: sft_records(seed, scale), SFT_EVAL_FILE: sft_eval_records(seed),
            DPO_FILE: dpo_records(seed, scale), DPO_EVAL_FILE: dpo_eval_records(seed)}
    for name, chat_records in chat.items():
        _write_lines(out / name, chat_records)
    return {
        "pretrain": str(out / PRETRAIN_FILE),
        "eval": str(out / EVAL_FILE),
        "pretrain_records": len(records),
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
        "tasks": counts,
    }
