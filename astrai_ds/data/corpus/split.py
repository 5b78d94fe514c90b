"""The seeded train / held-out split of the facts, and sampling renderings evenly over facts.

- open-set tasks (arithmetic, comparison, unit conversion) hold out whole facts, by identity (the operand
  pair, the value and unit): a held-out fact appears in no phrasing and no language of the training text,
  so the eval measures generalisation (copying the larger number, appending zeros, adding digits);
- closed-set tasks (weekdays, months, word facts) cannot hold out a fact without making it unlearnable, so
  they hold out one phrasing in one language of some facts; the fact itself stays in training in the other
  phrasings, and the eval measures transfer across phrasing and language.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from astrai_ds.data.corpus.facts import LANGS, TASKS, Fact, Task, task_facts

EVAL_PER_TASK_LANG = 15  # held-out eval items per (task, language); closed sets may have fewer


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


def sample_renderings(train: list[Fact], n: int, rng: random.Random) -> list[Fact]:
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


def per_task_lang(total: int, scale: float) -> int:
    """Records per (task, language) when `total` records at scale 1.0 are split evenly over both."""
    return max(1, round(total * scale / (len(TASKS) * len(LANGS))))
