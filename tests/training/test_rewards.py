"""GRPO's rewards: the built-ins on the corpus's records and on records of one's own, functions loaded by name,
weights, and every mistake as one line."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from astrai_ds.data.corpus import grpo_records, sft_eval_records
from astrai_ds.errors import ConfigError, UserError
from astrai_ds.inference.scoring import chat_answer_correct
from astrai_ds.training.rewards import BUILTINS, Reward, RewardError, load_rewards, score

EXACT, FORMAT, CONTAINS = BUILTINS["exact"], BUILTINS["format"], BUILTINS["contains"]
ADD = {"role": "user", "content": "What is 23 + 45?"}

USER_MODULE = '''
from helper import SCALE  # a neighbour of this file

CONSTANT = 3


def length(prompt, response, record):
    return len(response) * SCALE


def is_short(prompt, response, record):
    return len(response) < 4


class Scores:
    @staticmethod
    def answer_seen(prompt, response, record):
        return float(str(record["answer"]) in response)
'''


@pytest.fixture(scope="module")
def records():
    """Real corpus records: GRPO's training questions (every task and language) and the held-out ones."""
    return grpo_records(0, scale=0.05) + sft_eval_records(0)[::10]


def _rewards(records, response_of):
    return [(EXACT(r["messages"], response_of(r), r), FORMAT(r["messages"], response_of(r), r)) for r in records]


def test_builtins_on_corpus_records(records):
    assert {r["lang"] for r in records} == {"en", "zh"} and len({r["task"] for r in records}) == 11
    for r in records:
        plain, full = r["answers"]["plain"], r["answers"]["full"]
        wrong = plain + "0" if plain[-1] != "0" else plain[:-1] + "1"
        for response, expected in ((full, (1.0, 1.0)), (f" {full}\n", (1.0, 1.0)), (plain, (1.0, 0.0)),
                                   (wrong, (0.0, 0.0)), (wrong + full[len(plain):], (0.0, 1.0)),
                                   (f"I think {plain}", (0.0, 0.0)), ("", (0.0, 0.0))):
            got = (EXACT(r["messages"], response, r), FORMAT(r["messages"], response, r))
            assert got == expected, (r, response)
            assert got[0] == chat_answer_correct(response, r)  # the chat exact match of `astrai-ds eval --chat`
            assert CONTAINS(r["messages"], response, r) == float(plain.lower() in response.lower())  # chat_contains
        for form in r["full_forms"]:  # any phrasing of the fact justifies the value
            assert (EXACT(r["messages"], form, r), FORMAT(r["messages"], form, r)) == (1.0, 1.0)


@pytest.mark.parametrize("record, response, expected", [
    ({"messages": [ADD], "answer": "68"}, "68", (1.0, 0.0)),
    ({"messages": [ADD], "answer": " 68 "}, "68. 23 + 45 = 68.", (1.0, 1.0)),
    ({"messages": [ADD], "answer": "68"}, "69. 23 + 45 = 69.", (0.0, 1.0)),
    ({"messages": [ADD], "answer": "68"}, "68. It is 68. Sure.", (0.0, 0.0)),  # not one sentence: style "other"
    ({"messages": [ADD], "answer": 68}, "68", (1.0, 0.0)),
    ({"messages": [ADD], "answer": 68}, "68.0. 23 + 45 = 68.", (1.0, 1.0)),
    ({"messages": [ADD], "answer": 68.0}, "6.8e1", (1.0, 0.0)),
    ({"messages": [ADD], "answer": 68}, "69", (0.0, 0.0)),
    ({"messages": [ADD], "answer": 2.5}, "2.5", (1.0, 0.0)),
    ({"messages": [ADD], "answer": 68}, "1_000", (0.0, 0.0)),
    ({"messages": [ADD], "answer": True}, "true", (1.0, 0.0)),
    ({"messages": [ADD], "answer": "68", "preferred": "plain"}, "68", (1.0, 1.0)),
    # Chinese: the value and its sentence are joined by "。", known from the question's script without a "lang"
    ({"prompt": "23加45等于多少？", "answer": 68}, "68。23加45等于68。", (1.0, 1.0)),
    ({"prompt": "23加45等于多少？", "answer": "68", "lang": "en"}, "68。23加45等于68。", (0.0, 0.0)),
])
def test_builtins_on_records_of_ones_own(record, response, expected):
    from astrai_ds.data.prompts import prompt_messages

    prompt = prompt_messages(record)
    assert (EXACT(prompt, response, record), FORMAT(prompt, response, record)) == expected


@pytest.mark.parametrize("record, response, expected", [
    ({"messages": [ADD], "answer": "68"}, "The sum of 23 and 45 is 68.", 1.0),
    ({"messages": [ADD], "answer": 68}, "I  think it is   68", 1.0),
    ({"messages": [ADD], "answer": 68}, "It is 69.", 0.0),
    ({"messages": [ADD], "answer": "Rabbit"}, "the english word is rabbit.", 1.0),  # case aside
    ({"messages": [ADD], "answer": "New  York"}, "In new york.", 1.0),  # runs of whitespace aside
    ({"messages": [ADD], "answer": "68"}, "", 0.0),
])
def test_contains_gives_credit_for_the_value_anywhere(record, response, expected):
    from astrai_ds.data.prompts import prompt_messages

    assert CONTAINS(prompt_messages(record), response, record) == expected


def test_weights_combine(records):
    r = records[0]
    rewards = load_rewards({"exact": 1.0, "format": 0.5})
    assert [(x.name, x.fn, x.weight) for x in rewards] == [("exact", EXACT, 1.0), ("format", FORMAT, 0.5)]
    where = "grpo.jsonl line 1"
    assert score(rewards, r["messages"], r["answers"]["full"], r, where) == (1.5, {"exact": 1.0, "format": 1.0})
    assert score(rewards, r["messages"], r["answers"]["plain"], r, where) == (1.0, {"exact": 1.0, "format": 0.0})
    rewards = load_rewards({"exact": 2, "format": -0.25})  # an int weight, a penalty
    assert score(rewards, r["messages"], r["answers"]["full"], r, where) == (1.75, {"exact": 1.0, "format": 1.0})
    rewards = load_rewards({"format": 1.0, "exact": 0})  # a weight of 0: measured, not rewarded
    assert score(rewards, r["messages"], r["answers"]["full"], r, where) == (1.0, {"format": 1.0, "exact": 1.0})


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory with a reward module (my_rewards.py, importing its neighbour helper.py), another in a
    folder (sub/nested.py, importing sub/nearby.py), a broken one and one that fails on import; the modules they
    import are forgotten afterwards."""
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    (tmp_path / "helper.py").write_text("SCALE = 0.5\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "nested.py").write_text("from nearby import SCALE\n\n\ndef length(prompt, response, record):\n"
                                              "    return len(response) * SCALE\n")
    (tmp_path / "sub" / "nearby.py").write_text("SCALE = 2\n")
    (tmp_path / "broken.py").write_text("def f(prompt, response, record)\n    return 1\n")
    (tmp_path / "fails.py").write_text("1 / 0\n")
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def test_user_functions_by_module_and_by_file(user_dir):
    record = {"messages": [ADD], "answer": 68}
    by_module, by_file, nested, absolute, method = load_rewards({
        "my_rewards:length": 1.0, "my_rewards.py:is_short": 1.0, "sub/nested.py:length": 1.0,
        f"{user_dir / 'my_rewards.py'}:length": 1.0, "my_rewards:Scores.answer_seen": 2.0})
    assert str(user_dir) not in sys.path  # the working directory was on the path for the import only
    assert by_module.fn([ADD], "68. 23 + 45 = 68.", record) == 8.5  # 17 characters, helper.py's SCALE 0.5
    assert nested.fn([ADD], "6", record) == 2  # sub/nested.py imports its own neighbour
    assert by_file.fn([ADD], "68", record) is True
    assert absolute.fn([ADD], "68", record) == 1.0
    total, values = score([by_module, by_file, method], [ADD], "68", record, "line 1")
    assert values == {"my_rewards:length": 1.0, "my_rewards.py:is_short": 1.0, "my_rewards:Scores.answer_seen": 1.0}
    assert total == 1.0 + 1.0 + 2.0  # a bool counts as 1
    # the same file named twice is loaded once
    again = load_rewards({"my_rewards.py:length": 1.0})[0]
    assert again.fn.__module__ == by_file.fn.__module__


@pytest.mark.parametrize("spec, words", [
    ({}, ["grpo.rewards is empty", "exact, format", "'module:function'"]),
    (["exact"], ["grpo.rewards is list"]),
    ({"exat": 1.0}, ["grpo.rewards: unknown reward 'exat' (did you mean 'exact'?)", "the built-ins are exact, format",
                     "'path/to/file.py:function'"]),
    ({"": 1.0}, ["grpo.rewards: reward ''", "non-empty string"]),
    ({"no_such_module_xyz:f": 1.0}, ["grpo.rewards: reward 'no_such_module_xyz:f'", "working directory",
                                     "cannot import module 'no_such_module_xyz' (ModuleNotFoundError: No module"]),
    ({"my_rewards:lenght": 1.0}, ["reward 'my_rewards:lenght'", "my_rewards has no 'lenght' (did you mean 'length'?)"]),
    ({"my_rewards:CONSTANT": 1.0}, ["reward 'my_rewards:CONSTANT'", "is not a function", "but int"]),
    ({"my_rewards:": 1.0}, ["reward 'my_rewards:'", "name a function after the ':'"]),
    ({":length": 1.0}, ["reward ':length'", "name a function after the ':'"]),
    ({"missing.py:f": 1.0}, ["reward 'missing.py:f'", "no file missing.py", "working directory"]),
    ({"broken.py:f": 1.0}, ["reward 'broken.py:f'", "cannot load broken.py (SyntaxError"]),
    ({"fails.py:f": 1.0}, ["reward 'fails.py:f'", "cannot load fails.py (ZeroDivisionError: division by zero)"]),
    ({"exact": "1"}, ["grpo.rewards: reward 'exact'", "weight '1' is not a finite number"]),
    ({"exact": True}, ["weight True is not a finite number"]),
    ({"exact": None}, ["weight None is not a finite number"]),
    ({"exact": math.nan}, ["weight nan is not a finite number"]),
    ({"format": math.inf}, ["reward 'format'", "weight inf is not a finite number"]),
])
def test_each_mistake_is_one_line(user_dir, spec, words):
    with pytest.raises(ConfigError) as e:
        load_rewards(spec)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert str(user_dir) not in sys.path


def test_the_key_is_the_callers():
    with pytest.raises(ConfigError, match=r"^stages\.grpo\.rewards: unknown reward 'x'"):
        load_rewards({"x": 1.0}, key="stages.grpo.rewards")


def _reward(fn) -> Reward:
    return Reward("my_rewards:f", fn, 1.0)


def test_numbers_of_other_kinds_count():
    for value, expected in ((np.float32(0.5), 0.5), (np.int64(2), 2.0), (torch.tensor(0.25), 0.25), (False, 0.0),
                            (3, 3.0)):
        assert score([_reward(lambda p, r, rec, v=value: v)], [ADD], "68", {}, "line 1") == (expected,
                                                                                           {"my_rewards:f": expected})


def raising(prompt, response, record):
    raise KeyError("answer")


@pytest.mark.parametrize("fn, words", [
    (raising, ["reward 'my_rewards:f' failed on data/grpo.jsonl line 12: KeyError: 'answer'"]),
    (lambda p, r, rec: None, ["reward 'my_rewards:f' returned None (NoneType) on data/grpo.jsonl line 12",
                              "a finite number"]),
    (lambda p, r, rec: math.nan, ["returned nan (float) on data/grpo.jsonl line 12"]),
    (lambda p, r, rec: -math.inf, ["returned -inf (float)"]),
    (lambda p, r, rec: "1", ["returned '1' (str)"]),
    (lambda p, r, rec: "x" * 500, ["returned 'xxxx", "... (str)"]),
    (lambda p, r, rec: [1.0], ["returned [1.0] (list)"]),
    (lambda p, r, rec: torch.tensor([1.0, 2.0]), ["returned tensor([1., 2.]) (Tensor)"]),
    (lambda p, r, rec: (_ for _ in ()).throw(ValueError("a\nsecond line")), ["ValueError: a"]),
])
def test_a_failing_reward_is_one_line(fn, words):
    with pytest.raises(RewardError) as e:
        score([_reward(fn)], [ADD], "68", {"answer": 68}, "data/grpo.jsonl line 12")
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message and len(message) < 300, message
    assert all(w in message for w in words), message


def test_a_builtin_on_a_malformed_record_names_it():
    rewards = load_rewards({"exact": 1.0})
    with pytest.raises(RewardError, match=r"reward 'exact' failed on line 3: ValueError: the record's 'answers' is "
                                          r"not an object with a 'plain' string"):
        score(rewards, [ADD], "68", {"answer": "68", "answers": ["68"]}, "line 3")
