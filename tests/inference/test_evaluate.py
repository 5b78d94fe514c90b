"""Eval records are checked when read: a record of the wrong kind, or a bad one, is named with its line and what
to do. Chat evaluation: the per-answer records agree with the summary numbers and with the scoring rules."""

import json

import pytest
import torch

from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import DataError
from astrai_ds.inference.evaluate import evaluate_chat, read_eval_records
from astrai_ds.inference.scoring import answer_contained, chat_answer_correct
from astrai_ds.model import ModelConfig, Transformer


def test_chat_responses_match_the_summary(workspace):
    tok = Tokenizer.load(workspace / "tokenizer")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                      max_seq_len=128)
    model = Transformer(cfg)
    every = read_eval_records(workspace / "corpus" / "sft_eval.jsonl", "chat")
    records = [r for r in every if r["lang"] == "en"][:3] + [r for r in every if r["lang"] == "zh"][:3]
    responses: list[dict] = []
    result = evaluate_chat(model, tok, records, batch_size=4, max_new_tokens=8, responses=responses)
    assert [r["question"] for r in responses] == [rec["messages"][-1]["content"] for rec in records]
    assert [r["correct"] for r in responses] == [chat_answer_correct(r["response"], rec)
                                                 for r, rec in zip(responses, records)]
    assert result["chat_exact_match"] == sum(r["correct"] for r in responses) / len(records)
    assert result["chat_response_match"] == sum(r["exact_response"] for r in responses) / len(records)
    assert [r["contains"] for r in responses] == [answer_contained(r["response"], rec["answer"])
                                                  for r, rec in zip(responses, records)]
    assert result["chat_contains"] == sum(r["contains"] for r in responses) / len(records)
    for lang, rows in (("en", responses[:3]), ("zh", responses[3:])):  # each language apart
        assert result[lang]["n_chat"] == 3 and result[lang]["chat_exact_match"] == sum(r["correct"] for r in rows) / 3

    # Make the model's own (random) answer to the first question the reference: now it counts as correct.
    first = json.loads(json.dumps(records[0]))
    first["answers"]["plain"] = responses[0]["response"].strip() or "x"
    again: list[dict] = []
    evaluate_chat(model, tok, [first], max_new_tokens=8, responses=again)
    assert again[0]["response"] == responses[0]["response"]
    assert again[0]["exact_response"] == bool(responses[0]["response"].strip())


# (kind, the built-in file read as that kind, what the error must name)
WRONG_KIND = [
    ("facts", "sft_eval.jsonl", ["sft_eval.jsonl:1", "a chat record", "--chat instead of --data"]),
    ("facts", "dpo_eval.jsonl", ["dpo_eval.jsonl:1", "a pairs record", "--pairs instead of --data"]),
    ("chat", "pretrain_eval.jsonl", ["pretrain_eval.jsonl:1", "a facts record", "--data instead of --chat"]),
    ("chat", "dpo_eval.jsonl", ["dpo_eval.jsonl:1", "a pairs record", "--pairs instead of --chat"]),
    ("chat", "sft.jsonl", ["sft.jsonl:1", "not 'user'", "'answers' with 'plain' and 'full'", "sft_eval.jsonl"]),
    ("pairs", "pretrain_eval.jsonl", ["pretrain_eval.jsonl:1", "a facts record", "--data instead of --pairs"]),
    ("pairs", "sft_eval.jsonl", ["sft_eval.jsonl:1", "a chat record", "--chat instead of --pairs"]),
]


@pytest.mark.parametrize("kind, name, fragments", WRONG_KIND)
def test_records_of_the_wrong_kind_are_named(workspace, kind, name, fragments):
    with pytest.raises(DataError) as e:
        read_eval_records(workspace / "corpus" / name, kind)
    for fragment in fragments:
        assert fragment in str(e.value), (fragment, str(e.value))


def test_another_command_names_its_own_option(workspace):
    """A script with one option for the file (benchmarks/reward_headroom.py's --data) names it and what it expects,
    not `astrai-ds eval`'s other options."""
    with pytest.raises(DataError) as e:
        read_eval_records(workspace / "corpus" / "dpo_eval.jsonl", "chat", "--data")
    assert "a pairs record" in str(e.value) and "--data expects 'messages'" in str(e.value)
    assert "--pairs" not in str(e.value) and "--chat" not in str(e.value)


@pytest.mark.parametrize("kind, line, fragment", [
    ("facts", {"prompt": "1 + 1 =", "answer": 2}, "'prompt' and 'answer' are not both strings"),
    ("facts", {"title": "no field of any kind"}, "not an eval record; --data expects 'prompt' and 'answer'"),
    ("facts", [1, 2], "not an eval record"),
    ("chat", {"messages": [{"role": "user", "content": "1 + 1?"}], "answers": {"plain": "2"}},
     "'answers' is not an object with 'plain' and 'full' strings"),
    ("pairs", {"prompt": "1 + 1?", "chosen": "2", "rejected": 3}, "'rejected' is missing or not a string"),
])
def test_a_bad_record_is_named_with_its_line(tmp_path, kind, line, fragment):
    good = {"facts": {"prompt": "2 + 2 =", "answer": "4"},
            "chat": {"messages": [{"role": "user", "content": "2 + 2?"}], "answers": {"plain": "4", "full": "4."}},
            "pairs": {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}}[kind]
    path = tmp_path / "e.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError) as e:
        read_eval_records(path, kind)
    assert "e.jsonl:3: " in str(e.value) and fragment in str(e.value), str(e.value)
    path.write_text(json.dumps(good) + "\n")
    assert read_eval_records(path, kind) == [good]
