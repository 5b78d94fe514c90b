"""The built-in facts as chat data: SFT conversations, DPO pairs, GRPO questions and their held-out evaluation sets.

Every rendering becomes a question (`QUESTIONS`), answered in one of two styles: "plain", the bare value
("68", "星期二"), or "full", the value followed by a sentence that states the fact as its justification
("68. 23 + 45 = 68.", "68。23加45等于68。"). SFT answers take either style with probability 1/2, so SFT
teaches no preference between them; every DPO pair prefers the full style with the correct value, against
the plain style (correct value) or a plausible wrong value (full style). Both styles start with the value, so
a pair of the two styles differs only after it: DPO learns to go on with a justification, not to move away
from the value. After SFT the preferred style is a coin flip, after DPO it should not be
(`astrai_ds.inference.scoring.answer_style` measures it).

GRPO questions are asked without an answer to imitate: a record holds the question with its accepted answers, in
the form of the SFT evaluation set, for rewards to check a generated response against (`training.rewards`).

Training conversations, pairs and questions come from training renderings, the evaluation sets from held-out ones.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from astrai_ds.data.corpus.facts import (ADD, CONVERT, DAY_AFTER, DAY_BEFORE, EN_TO_ZH, FIRST_LETTER, LANGS, LARGER,
                                         LETTER_COUNT, MONTH_AFTER, MONTH_BEFORE, MONTH_LENGTH, OPPOSITE, SMALLER, SUB,
                                         TASKS, ZH_TO_EN, Fact, task_facts)
from astrai_ds.data.corpus.split import per_task_lang, sample_renderings, split_facts

SFT_CONVERSATIONS = 8_000  # SFT conversations at scale 1.0, split evenly over tasks and languages
DPO_PAIRS = 4_000  # DPO pairs at scale 1.0, split evenly over tasks and languages
GRPO_PROMPTS = 2_000  # GRPO questions at scale 1.0, split evenly over tasks and languages

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
P_SYSTEM = 0.3  # share of conversations (and DPO and GRPO prompts) with a system message
P_TWO_TURNS = 0.2  # share of SFT conversations with a second question and answer
STYLES = ("plain", "full")
PREFERRED_STYLE = "full"
JUSTIFY = {"en": ". ", "zh": "。"}  # between the value and the statement in a full answer


def justified(value: str, statement: str, lang: str) -> str:
    """A full-style answer: the value, then the sentence stating the fact."""
    return value + JUSTIFY[lang] + statement


def is_question(phrasing: str) -> bool:
    return phrasing.endswith(("?", "？"))


def _chat_forms() -> dict[str, tuple[dict, tuple[str, ...]]]:
    """phrasing -> (plain answer format per language, the group's statement phrasings in that language)."""
    forms = {}
    for group, plain in PLAIN_ANSWERS:
        for lang, phrasing, _ in group:
            forms[phrasing] = (plain, tuple(p for lng, p, _ in group if lng == lang and not is_question(p)))
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

    def full_forms(self, heldout_prompts: frozenset = frozenset()) -> list[str]:
        """Every full answer that is right (the value, then any phrasing of the fact in the language), but those
        that quote a rendering held out from pretraining (`heldout_prompts`, as in `chat_item`)."""
        forms = [justified(self.plain, f.render(), self.fact.lang) for f in self.statements
                 if (f.task, f.prompt) not in heldout_prompts]
        return forms or [self.full]

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


def _sampled(kind: str, seed: int, total: int, scale: float) -> tuple[dict, frozenset, list[Fact]]:
    """(training renderings by (task, language), held-out prompts, the renderings that open the `kind`
    records: `total` at scale 1.0, spread evenly over tasks, languages and facts, in that order)."""
    train, heldout = _chat_split(seed)
    n = per_task_lang(total, scale)
    sampled = [fact for (task, lang), facts in train.items()
               for fact in sample_renderings(facts, n, random.Random(f"{kind}:{seed}:{task}:{lang}"))]
    return train, heldout, sampled


def sft_records(seed: int = 0, scale: float = 1.0) -> list[dict]:
    """SFT conversations ({"messages"}) from training renderings, shuffled: the first question of each is
    spread evenly over tasks, languages and facts; P_TWO_TURNS of them ask a second question (any task, same
    language); every conversation answers in one style, plain or full with probability 1/2."""
    train, heldout, sampled = _sampled("sft", seed, SFT_CONVERSATIONS, scale)
    rng = random.Random(f"sft:{seed}")
    records = []
    for fact in sampled:
        items = [chat_item(fact, heldout)]
        if rng.random() < P_TWO_TURNS:
            items.append(chat_item(rng.choice(train[rng.choice(list(TASKS)), fact.lang]), heldout))
        style = rng.choice(STYLES)
        messages = _system(fact.lang, rng)
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
    _, heldout, sampled = _sampled("dpo", seed, DPO_PAIRS, scale)
    rng = random.Random(f"dpo:{seed}")
    records = [_pair(chat_item(fact, heldout), rng)[0] for fact in sampled]
    rng.shuffle(records)
    return records


def _question(item: ChatItem, rng: random.Random, heldout_prompts: frozenset = frozenset()) -> dict:
    """A question with its accepted answers: {"messages": [system?, user], "answer" (the plain value),
    "answers": {"plain", "full"}, "full_forms" (the right full answers that quote no rendering in
    `heldout_prompts`), "preferred": "full", "task", "lang"}."""
    fact = item.fact
    return {"messages": _system(fact.lang, rng) + [{"role": "user", "content": item.question}],
            "answer": item.plain, "answers": {"plain": item.plain, "full": item.full},
            "full_forms": item.full_forms(heldout_prompts), "preferred": PREFERRED_STYLE, "task": fact.task,
            "lang": fact.lang}


def grpo_records(seed: int = 0, scale: float = 1.0) -> list[dict]:
    """GRPO questions from training renderings, shuffled, in the form of `sft_eval_records`: spread evenly over
    tasks, languages and facts, with the answers for rewards to check; no answer quotes a held-out rendering."""
    _, heldout, sampled = _sampled("grpo", seed, GRPO_PROMPTS, scale)
    rng = random.Random(f"grpo:{seed}")
    records = [_question(chat_item(fact, heldout), rng, heldout) for fact in sampled]
    rng.shuffle(records)
    return records


def sft_eval_records(seed: int = 0) -> list[dict]:
    """One question per held-out eval rendering, in the form of `_question`; GRPO's evaluation set too."""
    split = split_facts(seed)
    heldout = frozenset((f.task, f.prompt) for f in split.heldout)
    rng = random.Random(f"sft_eval:{seed}")
    return [_question(chat_item(fact, heldout), rng) for fact in split.eval]


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

