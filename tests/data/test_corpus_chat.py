"""The built-in corpus in chat form: SFT conversations, DPO pairs, GRPO questions and their held-out evaluation
sets."""

import random

import pytest

from astrai_ds.data import corpus
from astrai_ds.data.chat import RAG_SYSTEM
from astrai_ds.data.corpus import (QUESTIONS, TASKS, chat_item, dpo_records, grpo_records, sft_records, split_facts,
                                   task_facts)
from astrai_ds.data.corpus.chat_forms import CHAT_FORMS, is_question
from astrai_ds.data.prepare import prepare_dpo, prepare_sft
from astrai_ds.inference.evaluate import read_eval_records
from astrai_ds.inference.scoring import answer_style, chat_answer_correct
from conftest import read_jsonl

from .conftest import CORPUS_SCALE as SCALE
CHAT_FILES = (corpus.SFT_FILE, corpus.SFT_EVAL_FILE, corpus.DPO_FILE, corpus.DPO_EVAL_FILE)
GRPO_FILES = (corpus.GRPO_FILE, corpus.GRPO_EVAL_FILE)


def _is_reading(record) -> bool:
    return record["messages"][0]["content"] == RAG_SYSTEM


@pytest.fixture(scope="module")
def written(corpus_seed0):
    """(folder, summary, the chat files' records) of tests/data/conftest.py's corpus; the SFT records are the
    facts' conversations only: the reading-comprehension ones are tested in test_documents.py."""
    out, summary = corpus_seed0
    files = {name: read_jsonl(out / name) for name in CHAT_FILES + GRPO_FILES}
    reading = [r for r in files[corpus.SFT_FILE] if _is_reading(r)]
    assert len(reading) == summary["reading_records"] > 0
    files[corpus.SFT_FILE] = [r for r in files[corpus.SFT_FILE] if not _is_reading(r)]
    return out, summary, files


def _questions(records, key="messages"):
    return {m["content"] for r in records for m in r[key] if m["role"] == "user"}


def test_deterministic_per_seed(written, corpus_seed0_again, corpus_seed1):
    out, same, other = written[0], corpus_seed0_again[0], corpus_seed1[0]
    for name in CHAT_FILES + GRPO_FILES:
        assert (same / name).read_bytes() == (out / name).read_bytes(), name
        assert (other / name).read_bytes() != (out / name).read_bytes(), name


def test_sizes_and_balance(written):
    out, summary, files = written
    sft, sft_eval, dpo, dpo_eval = (files[n] for n in CHAT_FILES)
    assert summary["sft_records"] - summary["reading_records"] == len(sft) == 22 * round(8000 * SCALE / 22)
    assert summary["dpo_records"] == len(dpo) == 22 * round(4000 * SCALE / 22)
    assert len(sft_eval) == len(dpo_eval) == len(split_facts(0).eval) == summary["sft_eval_items"]
    assert 250 <= len(sft_eval) <= 400
    for name in TASKS:
        for lang in ("en", "zh"):
            n = sum(r["task"] == name and r["lang"] == lang for r in sft_eval)
            assert 10 <= n <= corpus.EVAL_PER_TASK_LANG, (name, lang)
            assert sum(r["task"] == name and r["lang"] == lang for r in dpo_eval) == n
    assert summary["tasks"]["add"]["sft"] == 2 * round(8000 * SCALE / 22)


def test_full_scale_sizes():
    assert 7_500 <= len(sft_records(0)) <= 8_500
    assert 3_800 <= len(dpo_records(0)) <= 4_200
    assert 1_900 <= len(grpo_records(0)) <= 2_100


def _split_full(answer: str) -> tuple[str, str]:
    """(value, statement) of a full-style answer."""
    for joiner in corpus.JUSTIFY.values():
        value, sep, statement = answer.partition(joiner)
        if sep and statement:
            return value, statement
    raise AssertionError(f"not a full answer: {answer!r}")


def test_sft_conversations(written):
    _, _, files = written
    sft = files[corpus.SFT_FILE]
    full = plain = two_turns = system = 0
    for r in sft:
        roles = [m["role"] for m in r["messages"]]
        system += roles[0] == "system"
        turns = roles[1:] if roles[0] == "system" else roles
        assert turns in (["user", "assistant"], ["user", "assistant"] * 2)
        two_turns += len(turns) == 4
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        sentence = [a.endswith((".", "。")) for a in answers]
        assert len(set(sentence)) == 1  # one style per conversation
        full += sentence[0]
        plain += not sentence[0]
        for m in r["messages"]:
            if m["role"] == "user":
                assert m["content"].endswith(("?", "？")), m
    n = len(sft)
    assert 0.4 < full / n < 0.6 and 0.4 < plain / n < 0.6  # both styles, a coin flip: SFT prefers neither
    assert 0.12 < two_turns / n < 0.28 and 0.2 < system / n < 0.4
    langs = {"zh" if any("\u4e00" <= ch <= "\u9fff" for ch in r["messages"][-2]["content"]) else "en" for r in sft}
    assert langs == {"en", "zh"}


def test_examples_render_as_documented():
    facts = {f.prompt: f for f in task_facts("add")}
    item = chat_item(facts["23 + 45 ="])
    assert (item.question, item.plain, item.full) == ("What is 23 + 45?", "68", "68. 23 + 45 = 68.")
    item = chat_item(facts["23加45等于"])
    assert (item.question, item.plain, item.full) == ("23加45等于多少？", "68", "68。23加45等于68。")
    weekday = {f.prompt: f for f in task_facts("weekday")}
    item = chat_item(weekday["What day comes before Wednesday?"])  # already a question: asked as it is
    assert (item.question, item.plain, item.full) == ("What day comes before Wednesday?", "Tuesday",
                                                      "Tuesday. The day before Wednesday is Tuesday.")
    item = chat_item(weekday["星期一的后一天是"])
    assert (item.question, item.plain, item.full) == ("星期一的后一天是星期几？", "星期二", "星期二。星期一的后一天是星期二。")
    convert = {f.prompt: f for f in task_facts("convert")}
    item = chat_item(convert["5 km ="])
    assert item.full == "5000. 5 km = 5000 m."
    assert item.wrong_full(random.Random(0)) in {f"{v}. 5 km = {v} m." for v in ("500", "50000")}
    # Every phrasing of every task has a chat form whose full answer is the plain value, then a statement of
    # the fact; a wrong full answer has the same wrong value in both places.
    for name in TASKS:
        for f in task_facts(name)[::50]:
            item = chat_item(f)
            joiner = corpus.JUSTIFY[f.lang]
            assert item.full == item.plain + joiner + item.statement.render()
            assert not item.plain.endswith((".", "。")) and item.statement.render().endswith((".", "。"))
            assert item.question.endswith(("?", "？"))
            value, _, statement = item.wrong_full(random.Random(1)).partition(joiner)
            assert value != item.plain and statement == item.statement.render(value + item.statement.answer[len(item.plain):])
    assert len(set(QUESTIONS.values())) == len(QUESTIONS)


def test_heldout_facts_stay_out_of_training(written):
    _, _, files = written
    sft, sft_eval, dpo, dpo_eval = (files[n] for n in CHAT_FILES)
    train_questions = _questions(sft) | _questions(dpo, "prompt")
    eval_questions = _questions(sft_eval) | _questions(dpo_eval, "prompt")
    assert not train_questions & eval_questions
    split = split_facts(0)
    # Open-set tasks: no phrasing of a held-out fact is asked in training, in either language.
    for name, task in TASKS.items():
        if task.holdout == "fact":
            keys = {f.key for f in split.eval if f.task == name}
            heldout_questions = {chat_item(f).question for f in task_facts(name) if f.key in keys}
            assert not heldout_questions & train_questions, name
    # No training answer quotes a sentence held out from pretraining.
    heldout_texts = {f.text for f in split.heldout}
    answers = {m["content"] for r in sft for m in r["messages"] if m["role"] == "assistant"}
    answers |= {r["chosen"] for r in dpo} | {r["rejected"] for r in dpo}
    statements = {a.partition(j)[2] for a in answers for j in corpus.JUSTIFY.values()} - {""}
    assert statements and not statements & heldout_texts


def test_dpo_pairs_prefer_the_full_correct_answer(written):
    _, _, files = written
    dpo, sft_eval, dpo_eval = files[corpus.DPO_FILE], files[corpus.SFT_EVAL_FILE], files[corpus.DPO_EVAL_FILE]
    texts = {f.text for name in TASKS for f in task_facts(name)}
    kinds = {"plain": 0, "wrong": 0}
    for r in dpo:
        assert set(r) == {"prompt", "chosen", "rejected"} and r["prompt"][-1]["role"] == "user"
        assert r["chosen"] != r["rejected"]
        value, statement = _split_full(r["chosen"])
        assert statement in texts and r["chosen"].startswith(value)  # the value, then a true fact
        if r["rejected"].endswith((".", "。")):  # a wrong value, then a false sentence
            kinds["wrong"] += 1
            assert _split_full(r["rejected"])[1] not in texts
        else:  # the bare right value
            kinds["plain"] += 1
            assert r["rejected"] == value
    assert 0.4 < kinds["plain"] / len(dpo) < 0.6
    # The eval pairs line up with the SFT eval questions: chosen is the full answer, rejected is either.
    for pair, item in zip(dpo_eval, sft_eval):
        assert pair["prompt"][-1] == item["messages"][-1]
        assert (pair["task"], pair["lang"]) == (item["task"], item["lang"])
        assert answer_style(pair["chosen"], item) == "full" and chat_answer_correct(pair["chosen"], item)
        if pair["rejected_kind"] == "plain_correct":
            assert answer_style(pair["rejected"], item) == "plain" and chat_answer_correct(pair["rejected"], item)
        else:
            assert pair["rejected_kind"] == "full_wrong"
            assert answer_style(pair["rejected"], item) == "full" and not chat_answer_correct(pair["rejected"], item)


def test_eval_records(written):
    _, _, files = written
    items = files[corpus.SFT_EVAL_FILE]
    for it in items:
        assert set(it) == {"messages", "answer", "answers", "full_forms", "preferred", "task", "lang"}
        assert it["messages"][-1]["role"] == "user" and it["preferred"] == "full"
        assert it["answer"] == it["answers"]["plain"]
        assert answer_style(it["answers"]["full"], it) == "full" and answer_style(it["answers"]["plain"], it) == "plain"
        # every phrasing of the fact counts as a right full answer, and states the same value
        assert it["answers"]["full"] in it["full_forms"]
        for form in it["full_forms"]:
            assert it["answers"]["plain"] in form
            assert answer_style(form, it) == "full" and chat_answer_correct(form, it)
    add = next(it for it in items if it["task"] == "add" and it["lang"] == "en")
    a, b = add["messages"][-1]["content"].removeprefix("What is ").removesuffix("?").split(" + ")
    s = int(a) + int(b)
    assert add["answers"] == {"plain": str(s), "full": f"{s}. {a} + {b} = {s}."}


def test_grpo_questions(written):
    out, summary, files = written
    grpo = files[corpus.GRPO_FILE]
    assert summary["grpo_records"] == len(grpo) == 22 * round(2000 * SCALE / 22)
    assert summary["tasks"]["add"]["grpo"] == 2 * round(2000 * SCALE / 22)
    assert (summary["grpo"], summary["grpo_eval"]) == tuple(str(out / name) for name in GRPO_FILES)
    assert read_eval_records(out / corpus.GRPO_FILE, "chat") == grpo  # what `astrai-ds eval --chat` accepts
    for r in grpo:  # the form of sft_eval.jsonl, each accepted answer right and in its style
        assert set(r) == {"messages", "answer", "answers", "full_forms", "preferred", "task", "lang"}
        assert r["answer"] == r["answers"]["plain"] and r["preferred"] == "full"
        assert answer_style(r["answers"]["plain"], r) == "plain" and chat_answer_correct(r["answers"]["plain"], r)
        for form in (r["answers"]["full"], *r["full_forms"]):
            assert answer_style(form, r) == "full" and chat_answer_correct(form, r)
    for name in TASKS:
        for lang in ("en", "zh"):
            assert sum(r["task"] == name and r["lang"] == lang for r in grpo) == round(2000 * SCALE / 22)
    assert 0.2 < sum(r["messages"][0]["role"] == "system" for r in grpo) / len(grpo) < 0.4


def test_grpo_questions_hold_nothing_out(written):
    _, _, files = written
    grpo = files[corpus.GRPO_FILE]
    split = split_facts(0)
    assert not _questions(grpo) & {chat_item(f).question for f in split.heldout}
    heldout_texts = {f.text for f in split.heldout}
    statements = {form.partition(corpus.JUSTIFY[r["lang"]])[2] for r in grpo
                  for form in (r["answers"]["full"], *r["full_forms"])}
    assert statements and not statements & heldout_texts


def test_grpo_eval_is_the_chat_eval(written):
    out, summary, files = written
    assert (out / corpus.GRPO_EVAL_FILE).read_bytes() == (out / corpus.SFT_EVAL_FILE).read_bytes()
    assert summary["grpo_eval_items"] == summary["sft_eval_items"] == len(files[corpus.GRPO_EVAL_FILE])


def test_every_phrasing_has_one_question_and_a_statement():
    questions = [QUESTIONS.get(p, p) for p in CHAT_FORMS]
    assert len(set(questions)) == len(questions), "two phrasings share a question"
    for phrasing, (_, statements) in CHAT_FORMS.items():
        assert is_question(phrasing) or phrasing in QUESTIONS, phrasing
        assert statements, f"{phrasing!r} has no statement phrasing in its language to justify a full answer"
    assert {f.phrasing for name in TASKS for f in task_facts(name)} <= set(CHAT_FORMS)


def test_chat_files_prepare_without_skips(written, tokenizer_dir, tmp_path):
    out, _, files = written
    # 1024: a reading-comprehension conversation is a few hundred tokens of this 512-token test vocabulary
    s = prepare_sft([out / corpus.SFT_FILE], tokenizer_dir, tmp_path / "sft", seq_len=1024, workers=1, progress=False)
    assert s["skipped"] == {} and s["num_conversations"] == len(read_jsonl(out / corpus.SFT_FILE))
    s = prepare_dpo([out / corpus.DPO_FILE, out / corpus.DPO_EVAL_FILE], tokenizer_dir, tmp_path / "dpo",
                    seq_len=256, workers=1, progress=False)
    assert s["skipped"] == {} and s["num_pairs"] == len(files[corpus.DPO_FILE]) + len(files[corpus.DPO_EVAL_FILE])
