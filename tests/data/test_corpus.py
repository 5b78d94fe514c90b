import random

import pytest

from astrai_ds.data import corpus
from astrai_ds.data.corpus import TASKS, split_facts, task_facts, write_corpus
from astrai_ds.data.corpus.facts import register
from astrai_ds.data.corpus.words import (ANTONYMS, MONTH_DAYS, MONTHS_EN, MONTHS_ZH, UNITS, WEEKDAYS_EN, WEEKDAYS_ZH,
                                         WORDS)
from astrai_ds.errors import DataError
from conftest import read_jsonl

@pytest.fixture(scope="module")
def written(corpus_seed0):
    return corpus_seed0  # tests/data/conftest.py: (folder, summary) at CORPUS_SCALE, seed 0


def test_same_seed_gives_identical_bytes(written, corpus_seed0_again):
    out, again = written[0], corpus_seed0_again[0]
    for name in (corpus.PRETRAIN_FILE, corpus.EVAL_FILE):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_other_seed_differs(written, corpus_seed1):
    out, other = written[0], corpus_seed1[0]
    assert (other / corpus.EVAL_FILE).read_bytes() != (out / corpus.EVAL_FILE).read_bytes()
    assert (other / corpus.PRETRAIN_FILE).read_bytes() != (out / corpus.PRETRAIN_FILE).read_bytes()


def test_heldout_facts_never_in_pretrain(written):
    out, summary = written
    pretrain = {r["text"] for r in read_jsonl(out / corpus.PRETRAIN_FILE)}
    split = split_facts(0)
    assert not pretrain & {f.text for f in split.heldout}
    # Open-set tasks hold out whole facts: no phrasing in either language of a held-out key is trained on.
    for name, task in TASKS.items():
        keys = {f.key for f in split.eval if f.task == name}
        if task.holdout == "fact":
            assert not {f.text for f in task_facts(name) if f.key in keys} & pretrain, name
        else:  # closed sets keep the fact in other phrasings
            assert {f.key for f in task_facts(name) if f.key in keys and f.text in pretrain} == keys, name
    # Independent of scale: a bigger corpus holds out the same eval items.
    assert summary["eval_items"] == len(split.eval)


def test_eval_format_and_balance(written):
    out, summary = written
    items = read_jsonl(out / corpus.EVAL_FILE)
    assert 250 <= len(items) <= 400 and summary["eval_items"] == len(items)
    for it in items:
        assert set(it) == {"prompt", "answer", "text", "lang", "task"}
        sep, end = (" ", ".") if it["lang"] == "en" else ("", "。")
        assert it["text"] == it["prompt"] + sep + it["answer"] + end
        assert not it["prompt"].endswith(" ") and it["answer"]
    for name in TASKS:
        for lang in ("en", "zh"):
            n = sum(it["task"] == name and it["lang"] == lang for it in items)
            assert 10 <= n <= corpus.EVAL_PER_TASK_LANG, (name, lang, n)


def test_pretrain_content(written):
    out, summary = written
    texts = [r["text"] for r in read_jsonl(out / corpus.PRETRAIN_FILE)]
    assert len(texts) == summary["pretrain_records"]
    # reading texts: an article (training articles and drills), then its questions and answers
    reading = [t for t in texts if t.startswith("# ")]
    assert len(reading) == summary["reading_texts"] and all("\nQuestion: " in t and "\nAnswer: " in t for t in reading)
    texts = [t for t in texts if not t.startswith("# ")]
    assert len(texts) == sum(t["pretrain"] for t in summary["tasks"].values())
    assert any(t.endswith("。") for t in texts) and any(t.endswith(".") for t in texts)
    assert all(t.endswith((".", "。")) and "  " not in t for t in texts)
    facts = {f.text: f for name in TASKS for f in task_facts(name)}
    assert all(t in facts for t in texts)  # every line is a known fact rendering
    assert {facts[t].task for t in texts} == set(TASKS)


def test_examples_render_as_documented():
    texts = {f.text for name in TASKS for f in task_facts(name)}
    for t in ["23 + 45 = 68.", "23加45等于68。", "The larger of 37 and 52 is 52.", "37和52中较大的是52。",
              "5 km = 5000 m.", "5千米等于5000米。", "The day after Monday is Tuesday.", "星期一的后一天是星期二。",
              "The word apple has 5 letters.", "The first letter of apple is a.", "大的反义词是小。",
              "The Chinese for apple is 苹果.", "apple的中文是苹果。", "February has 28 days.", "68 - 45 = 23."]:
        assert t in texts, t


def test_word_tables_have_one_answer_per_fact():
    # Every column unique: "the Chinese for X", "the opposite of X" and "the day after X" have one answer.
    en, zh = [w for w, _ in WORDS], [z for _, z in WORDS]
    assert len(set(en)) == len(en) and len(set(zh)) == len(zh)
    assert all(w.isascii() and w.isalpha() and w.islower() for w in en)  # letter counts and first letters
    antonyms_en = [w for p in ANTONYMS for w in p[2:]]
    antonyms_zh = [w for p in ANTONYMS for w in p[:2]]
    assert len(set(antonyms_en)) == len(antonyms_en) and len(set(antonyms_zh)) == len(antonyms_zh)
    for names in (WEEKDAYS_EN, WEEKDAYS_ZH, MONTHS_EN, MONTHS_ZH):
        assert len(set(names)) == len(names)
    assert len(WEEKDAYS_EN) == len(WEEKDAYS_ZH) == 7 and len(MONTHS_EN) == len(MONTHS_ZH) == 12
    assert sum(MONTH_DAYS) == 365
    assert len({u[2] for u in UNITS.values()}) == len(UNITS) and all(u[0] != u[1] for u in UNITS.values())


def test_register_refuses_an_unknown_holdout():
    with pytest.raises(ValueError, match="holdout must be 'fact' or 'rendering'"):
        register("nope", holdout="phrasing", pretrain_records=1)
    assert "nope" not in TASKS


def test_all_renderings_unique_and_have_wrong_answers():
    facts = [f for name in TASKS for f in task_facts(name)]
    assert len({f.text for f in facts}) == len(facts)
    assert all(f.distractors and f.answer not in f.distractors for f in facts)
    rng = random.Random(0)
    for f in facts[::97]:
        wrong = f.wrong_answer(rng)
        assert wrong != f.answer and f.render(wrong) != f.text


def test_full_scale_size(tmp_path):
    summary = write_corpus(tmp_path, seed=0)  # scale 1.0: the corpus a tiny model trains on
    assert 1_000_000 < summary["pretrain_bytes"] < 3_000_000
    assert summary["pretrain_bytes"] == (tmp_path / corpus.PRETRAIN_FILE).stat().st_size


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError):
        write_corpus(tmp_path, scale=0)
    with pytest.raises(DataError):
        write_corpus(tmp_path, seed=-1)
