"""`rag eval`: recall at k and exact answers on the corpus's held-out documents. BM25 over the model's tokens finds
the chunk that states the answer whatever the weights; scripted answers get the scores written out by hand, per
language too; the index must hold the questions' documents; the CLI writes the metrics `report --stage rag` reads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from astrai_ds.cli.main import main
from astrai_ds.errors import UserError
from astrai_ds.inference.engine import LLMEngine
from astrai_ds.model.io import load_model_folder
from astrai_ds.rag.chunking import ChunkParams
from astrai_ds.inference.embed import Embedder
from astrai_ds.rag.evaluate import answer_contained, answer_value, evaluate_rag, read_questions
from astrai_ds.rag.documents import read_documents
from astrai_ds.rag.index import MODES, Index, build_index


@pytest.mark.parametrize("response, value", [
    ("Venlu", "Venlu"), (" Venlu.", "Venlu"), ("Venlu. The capital of Senofi is Venlu.", "Venlu"),
    ("the zanbi lamp", "the zanbi lamp"), ("鲁诺。比塞塔的首都是鲁诺。", "鲁诺"), ("3.5", "3.5"), ("", ""),
])
def test_the_value_of_an_answer(response, value):
    assert answer_value(response) == value


@pytest.mark.parametrize("response, answer, contained", [
    ("The Mimo Max came out in 2012.", "2012", True), ("VENLU is its capital", "Venlu", True),
    ("the  zanbi\nlamp", "the zanbi lamp", True), ("比塞塔的首都是鲁诺。", "鲁诺", True), ("Venl", "Venlu", False),
    ("anything", "", False), ("the zanbilamp", "the zanbi lamp", False),
])
def test_an_answer_contained_in_a_response(response, answer, contained):
    assert answer_contained(response, answer) == contained


@pytest.fixture(scope="module")
def corpus_index(workspace, long_model_dir, tmp_path_factory):
    model, tokenizer = load_model_folder(long_model_dir, dtype=torch.float32)
    docs, skipped = read_documents([workspace / "corpus" / "documents_eval.jsonl"])
    assert not skipped
    out = tmp_path_factory.mktemp("rag") / "index"
    build_index(docs, long_model_dir, out, model, tokenizer, ChunkParams(max_tokens=128), progress=False)
    return Index.load(out), model, tokenizer


def test_recall_and_answers_on_the_held_out_documents(workspace, corpus_index):
    index, model, tokenizer = corpus_index
    questions = read_questions(workspace / "corpus" / "documents_eval.jsonl")
    held = [json.loads(line) for line in (workspace / "corpus" / "documents_eval.jsonl").read_text().splitlines()]
    assert len(questions) == sum(len(d["qa"]) for d in held)
    metrics, records = evaluate_rag(index, Embedder(model, tokenizer), LLMEngine(model, tokenizer), questions,
                                    k=5, answer_k=3, max_new_tokens=8)
    recall = metrics["recall_at_5"]
    assert set(recall) == set(MODES) and all(0.0 <= v <= 1.0 for v in recall.values())
    # the names are rare tokens: lexical search finds the entity's chunk, trained weights or not
    assert recall["bm25"] >= 0.9, recall
    assert all(1 <= r["rag_chunks"] <= 3 for r in records)
    assert {"en", "zh"} <= set(metrics) and sum(metrics[lang]["questions"] for lang in ("en", "zh")) == len(records)


SCRIPTED = [  # (document, [(question, answer, {kind of answer: the response})])
    ({"lang": "en", "text": "# Senofi\n\nSenofi is a country by the sea. Its capital is Venlu.\n\n## Economy\n\n"
                            "The currency of Senofi is the zanbi.\n"},
     [("What is the capital of Senofi?", "Venlu",
       {"closed_book": "I do not know.", "rag": "Venlu. The capital of Senofi is Venlu.", "oracle": "venlu"}),
      ("What is the currency of Senofi?", "zanbi",
       {"closed_book": "zanbi", "rag": "The currency is the zanbi.", "oracle": "zanbi."})]),
    ({"lang": "zh", "text": "# 比塞塔\n\n比塞塔的首都是鲁诺。\n"},
     [("比塞塔的首都是哪里？", "鲁诺", {"closed_book": "鲁诺。", "rag": "比塞塔的首都是鲁诺。", "oracle": "鲁诺"})]),
]


class ScriptedEngine:
    """The engine's prompt side, with scripted answers: what `evaluate_rag` makes of given responses."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.tokenizer, self.max_context = engine, engine.tokenizer, engine.max_context
        self.answers = {q: responses for _, qa in SCRIPTED for q, _, responses in qa}
        self.prompts: dict[str, list[str]] = {}

    def encode(self, messages):
        return self.engine.encode(messages)

    def generate_batch(self, prompts, params, progress=False, desc=""):
        kind = desc.removeprefix("answers (").removesuffix(")")
        users = [p[-1]["content"] for p in prompts]
        self.prompts[kind] = users
        return [SimpleNamespace(text=self.answers[u.rsplit("Question: ", 1)[1]][kind], error=None) for u in users]


def test_answers_are_scored_by_their_value_and_containment(long_model_dir, tmp_path):
    model, tokenizer = load_model_folder(long_model_dir, dtype=torch.float32)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({**d, "qa": [{"question": q, "answer": a} for q, a, _ in qa]},
                                       ensure_ascii=False) + "\n" for d, qa in SCRIPTED), encoding="utf-8")
    build_index(read_documents([docs])[0], long_model_dir, tmp_path / "index", model, tokenizer,
                ChunkParams(max_tokens=48), progress=False)
    engine = ScriptedEngine(LLMEngine(model, tokenizer))
    metrics, records = evaluate_rag(Index.load(tmp_path / "index"), Embedder(model, tokenizer), engine,
                                    read_questions(docs), k=5, answer_k=3, max_new_tokens=8)
    assert [(r["closed_book_correct"], r["rag_correct"], r["oracle_correct"]) for r in records] == [
        (False, True, False), (True, False, True), (True, False, True)]
    assert [(r["closed_book_contains"], r["rag_contains"], r["oracle_contains"]) for r in records] == [
        (False, True, True), (True, True, True), (True, True, True)]

    def scores(m: dict) -> dict:
        return {k: v for k, v in m.items() if k.startswith(("answer_em_", "answer_contains_"))}

    assert scores(metrics) == pytest.approx({
        "answer_em_closed_book": 2 / 3, "answer_em_rag": 1 / 3, "answer_em_oracle": 2 / 3,
        "answer_contains_closed_book": 2 / 3, "answer_contains_rag": 1.0, "answer_contains_oracle": 1.0})
    assert scores(metrics["en"]) == pytest.approx({
        "answer_em_closed_book": 0.5, "answer_em_rag": 0.5, "answer_em_oracle": 0.5,
        "answer_contains_closed_book": 0.5, "answer_contains_rag": 1.0, "answer_contains_oracle": 1.0})
    assert scores(metrics["zh"]) == {
        "answer_em_closed_book": 1.0, "answer_em_rag": 0.0, "answer_em_oracle": 1.0,
        "answer_contains_closed_book": 1.0, "answer_contains_rag": 1.0, "answer_contains_oracle": 1.0}
    assert (metrics["questions"], metrics["en"]["questions"], metrics["zh"]["questions"]) == (3, 2, 1)
    assert metrics["recall_at_5"] == {"dense": 1.0, "bm25": 1.0, "hybrid": 1.0}  # k is more than the chunks
    # closed-book prompts hold no context; the oracle's holds the chunk that states the answer
    assert all(u.startswith("Question: ") for u in engine.prompts["closed_book"])
    assert [("Venlu" in u, "zanbi" in u.split("Question: ")[0], "鲁诺" in u) for u in engine.prompts["oracle"]] \
        == [(True, False, False), (False, True, False), (False, False, True)]


def test_the_index_must_hold_the_questions_documents(workspace, corpus_index, tmp_path):
    index, model, tokenizer = corpus_index
    other = read_questions(workspace / "corpus" / "documents.jsonl")[:3]  # training articles: not in the index
    with pytest.raises(UserError, match="lacks the documents of 3 of the 3 questions"):
        evaluate_rag(index, Embedder(model, tokenizer), LLMEngine(model, tokenizer), other)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "# A\n\nA is a place."}) + "\n")
    with pytest.raises(UserError, match="a record needs 'text' and 'qa'"):
        read_questions(bad)


def test_rag_eval_writes_what_report_reads(workspace, long_model_dir, tmp_path, capsys):
    docs = workspace / "corpus" / "documents_eval.jsonl"
    held = [json.loads(line) for line in docs.read_text().splitlines()][:6]
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in held), encoding="utf-8")
    common = ["--model", str(long_model_dir), "--dtype", "fp32"]
    assert main(["rag", "index", "--docs", str(few), "--out", str(tmp_path / "i"), *common]) == 0
    assert main(["rag", "eval", "--index", str(tmp_path / "i"), "--docs", str(few), "--out", str(tmp_path / "rag.json"),
                 "--responses", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "4", *common]) == 0
    assert "recall at 5: dense" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "rag.json").read_text())
    assert metrics["questions"] == sum(len(d["qa"]) for d in held) == len((tmp_path / "answers.jsonl").read_text()
                                                                           .splitlines())
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"pt": {"eval_loss": 1.5}}))
    assert main(["report", "--stage", "rag", "--eval", str(tmp_path / "rag.json"), "--out", str(report)]) == 0
    merged = json.loads(report.read_text())
    assert merged["pt"] == {"eval_loss": 1.5} and merged["rag"]["recall_at_5"] == metrics["recall_at_5"]
    assert merged["rag"]["answer_contains_rag"] == metrics["answer_contains_rag"]
    assert merged["rag"]["zh"] == metrics["zh"]
    assert "rag: closed_book" in capsys.readouterr().out
    # a model's RAG and chat results in one entry, with no run (a pretrained model before fine-tuning)
    chat = {"chat_exact_match": 0.25, "n_chat": 8, "en": {"chat_exact_match": 0.5, "n_chat": 4},
            "zh": {"chat_exact_match": 0.0, "n_chat": 4}}
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    assert main(["report", "--stage", "base", "--eval", str(tmp_path / "rag.json"), str(tmp_path / "chat.json"),
                 "--out", str(report)]) == 0
    base = json.loads(report.read_text())["base"]
    assert base["chat_exact_match"] == 0.25 and base["answer_em_rag"] == metrics["answer_em_rag"]
    assert base["zh"] == {**metrics["zh"], "chat_exact_match": 0.0}  # per language: both files' fields
    assert "tokens_per_sec" not in base and "  zh: closed_book" in capsys.readouterr().out
    merged = json.loads(report.read_text())
    # a stage file is not a RAG result
    (tmp_path / "stage.json").write_text(json.dumps({"eval_loss": 2.0}))
    assert main(["report", "--stage", "rag", "--eval", str(tmp_path / "stage.json"), "--out", str(report)]) == 2
    assert "lacks answer_em_closed_book" in capsys.readouterr().err
    assert json.loads(report.read_text()) == merged
