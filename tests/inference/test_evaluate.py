"""Chat evaluation: the per-answer records agree with the summary numbers and with the scoring rules."""

import json

import torch

from astrai_ds.data.corpus import chat_answer_correct
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.inference.evaluate import evaluate_chat, read_eval_records
from astrai_ds.model import ModelConfig, Transformer


def test_chat_responses_match_the_summary(workspace):
    tok = Tokenizer.load(workspace / "tokenizer")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                      max_seq_len=128)
    model = Transformer(cfg)
    records = read_eval_records(workspace / "corpus" / "sft_eval.jsonl")[:6]
    responses: list[dict] = []
    result = evaluate_chat(model, tok, records, batch_size=4, max_new_tokens=8, responses=responses)
    assert [r["question"] for r in responses] == [rec["messages"][-1]["content"] for rec in records]
    assert [r["correct"] for r in responses] == [chat_answer_correct(r["response"], rec)
                                                 for r, rec in zip(responses, records)]
    assert result["chat_exact_match"] == sum(r["correct"] for r in responses) / len(records)
    assert result["chat_response_match"] == sum(r["exact_response"] for r in responses) / len(records)

    # Make the model's own (random) answer to the first question the reference: now it counts as correct.
    first = json.loads(json.dumps(records[0]))
    first["answers"]["plain"] = responses[0]["response"].strip() or "x"
    again: list[dict] = []
    evaluate_chat(model, tok, [first], max_new_tokens=8, responses=again)
    assert again[0]["response"] == responses[0]["response"]
    assert again[0]["exact_response"] == bool(responses[0]["response"].strip())
