"""Prompt records (GRPO's data): reading and checking, one line per mistake."""

import json

import pytest

from astrai_ds.data.prompts import prompt_messages, read_prompt_records
from astrai_ds.errors import DataError

USER = {"role": "user", "content": "What is 23 + 45?"}


def _write(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n"
                            for line in lines), encoding="utf-8")
    return path


def test_reads_both_forms(tmp_path):
    records = [{"messages": [{"role": "system", "content": "Be brief."}, USER], "answer": "68", "task": "add"},
               {"prompt": "23加45等于多少？", "answer": 68},
               {"prompt": [USER], "answer": ["any", "json", {"value": True}]},
               {"messages": [USER], "answer": ""}]
    path = _write(tmp_path / "p.jsonl", [records[0], "", "  ", *records[1:]])
    assert read_prompt_records(path) == records  # as read, extra fields kept, blank lines skipped
    assert [prompt_messages(r) for r in records] == [
        records[0]["messages"], [{"role": "user", "content": "23加45等于多少？"}], [USER], [USER]]


def test_reads_the_corpus_grpo_file(corpus_seed0):
    out, summary = corpus_seed0
    records = read_prompt_records(summary["grpo"])
    assert len(records) == summary["grpo_records"]
    assert all(prompt_messages(r)[-1]["role"] == "user" for r in records)


@pytest.mark.parametrize("line, words", [
    ({"messages": [USER, {"role": "assistant", "content": "68"}]},
     ["p.jsonl:2", "no 'answer'", "SFT conversation", "needs the 'answer' of every prompt", "astrai-ds corpus",
      "grpo.jsonl"]),
    ({"messages": [USER], "answer": None}, ["p.jsonl:2", "'answer' is null"]),
    ({"prompt": "What is 1 + 1?"}, ["p.jsonl:2", "no 'answer'"]),
    ({"question": "What is 1 + 1?", "answer": "2"}, ["p.jsonl:2", "no 'messages' or 'prompt'"]),
    ({"prompt": 7, "answer": "2"}, ["p.jsonl:2", "'prompt' is int, not a string or a messages list"]),
    ({"prompt": "", "answer": "2"}, ["p.jsonl:2", "'prompt' is empty"]),
    ({"messages": [], "answer": "2"}, ["p.jsonl:2", "'messages' is empty"]),
    ({"messages": [USER, {"role": "assistant", "content": "2"}], "answer": "2"},
     ["p.jsonl:2", "'messages'", "last message has role 'assistant', not 'user'"]),
    ({"messages": [{"role": "robot", "content": "hi"}], "answer": "2"}, ["p.jsonl:2", "'messages'", "role 'robot'"]),
    ({"messages": [{"role": "user", "content": "  "}], "answer": "2"}, ["p.jsonl:2", "'messages'", "is empty"]),
    ({"messages": ["hi"], "answer": "2"}, ["p.jsonl:2", "'messages'", "not an object with 'role' and 'content'"]),
    (["a", "list"], ["p.jsonl:2", "not a JSON object but list"]),
    ('{"prompt": "x", "answer": ', ["p.jsonl:2", "invalid JSON"]),
])
def test_each_mistake_is_one_line(tmp_path, line, words):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "What is 1 + 1?", "answer": "2"}, line])
    with pytest.raises(DataError) as e:
        read_prompt_records(path)
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    if "invalid JSON" not in message:
        assert "GRPO expects" in message and "'answer'" in message


def test_missing_empty_and_undecodable_files(tmp_path):
    with pytest.raises(DataError, match=r"prompt data not found: .*nope.jsonl .*astrai-ds corpus"):
        read_prompt_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="prompt data not found"):
        read_prompt_records(tmp_path)  # a folder
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=rf"{name}: no records .*GRPO expects"):
            read_prompt_records(tmp_path / name)
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "café", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl: not UTF-8 text"):
        read_prompt_records(tmp_path / "latin1.jsonl")
