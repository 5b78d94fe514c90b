"""The lm-evaluation-harness task files `astrai-ds corpus` writes: lm-eval loads all four from them (local files,
nothing downloaded), and each renders a record as `astrai-ds eval` and `rag eval` ask it."""

from __future__ import annotations

import pytest

from conftest import read_jsonl


@pytest.fixture(scope="module")
def tasks(workspace):
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(workspace / "corpus" / "lm_eval")).load(["astrai"])
    assert list(loaded["groups"]) == ["astrai"]
    return loaded["tasks"]


def test_the_group_loads_four_tasks_over_the_corpus_files(tasks, workspace):
    corpus = workspace / "corpus"
    assert sorted(tasks) == ["astrai_chat", "astrai_pairs", "astrai_reading", "astrai_text"]
    sizes = {name: len(task.eval_docs) for name, task in tasks.items()}
    questions = sum(len(d["qa"]) for d in read_jsonl(corpus / "documents_eval.jsonl"))
    assert sizes == {"astrai_pairs": len(read_jsonl(corpus / "dpo_eval.jsonl")),
                     "astrai_chat": len(read_jsonl(corpus / "sft_eval.jsonl")),
                     "astrai_text": len(read_jsonl(corpus / "pretrain_eval.jsonl")), "astrai_reading": questions}
    assert all(task.config.output_type == kind for task, kind in zip(
        (tasks["astrai_pairs"], tasks["astrai_chat"], tasks["astrai_text"], tasks["astrai_reading"]),
        ("multiple_choice", "generate_until", "loglikelihood_rolling", "generate_until")))


def test_each_task_renders_a_record_as_our_evaluations_ask_it(tasks, workspace):
    corpus = workspace / "corpus"
    pair = next(r for r in read_jsonl(corpus / "dpo_eval.jsonl") if r["prompt"][0]["role"] == "system")
    t = tasks["astrai_pairs"]
    doc = next(d for d in t.eval_docs if d["chosen"] == pair["chosen"] and d["prompt"] == pair["prompt"])
    # the system message is the task's per-record description (lm-eval's system turn), the question the text
    assert (t.resolve_field(doc, t.config.description), t.doc_to_text(doc)) == (
        pair["prompt"][0]["content"], pair["prompt"][-1]["content"])
    assert t.doc_to_choice(doc) == [pair["chosen"] + "<|im_end|>", pair["rejected"] + "<|im_end|>"]
    assert t.doc_to_target(doc) == 0 and t.config.target_delimiter == ""

    t = tasks["astrai_chat"]
    record, doc = read_jsonl(corpus / "sft_eval.jsonl")[0], t.eval_docs[0]
    assert t.resolve_field(doc, t.config.description) == ""  # no system message: no system turn
    assert t.doc_to_target(doc) == [record["answers"]["plain"], *record["full_forms"]]
    assert t.config.generation_kwargs["until"] == ["<|im_end|>"]

    assert tasks["astrai_text"].doc_to_target(tasks["astrai_text"].eval_docs[0]) == read_jsonl(
        corpus / "pretrain_eval.jsonl")[0]["text"]

    t = tasks["astrai_reading"]
    doc = t.eval_docs[0]
    assert doc["answer"] in t.doc_to_text(doc).split("Question:")[0]  # the section that states it is the context
    assert t.process_results(doc, [f"{doc['answer']}. More words."]) == {"answer_em": 1.0, "answer_contains": 1.0}
    assert t.process_results(doc, [f"It is {doc['answer']}."]) == {"answer_em": 0.0, "answer_contains": 1.0}
