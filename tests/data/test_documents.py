"""The retrieval documents of the built-in corpus: deterministic, in both languages, with headings; every answer
is written in its article; held-out entities appear in no training article; the chunker keeps their structure."""

from __future__ import annotations

import json

from astrai_ds.data.corpus.documents import articles, drill_articles, split_articles
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.rag.chunking import ChunkParams, chunk_document


def test_articles_are_deterministic_and_varied():
    a, b = articles(60, seed=3), articles(60, seed=3)
    assert a == b and articles(60, seed=4) != a
    assert {d.lang for d in a} == {"en", "zh"} and {d.kind for d in a} == {"country", "person", "product"}
    assert len({d.title for d in a}) == len(a) and len({d.id for d in a}) == len(a)


def test_every_answer_is_in_its_article_and_questions_are_distinct():
    for d in articles(90):
        assert d.text.startswith(f"# {d.title}\n") and d.text.count("\n## ") >= 2
        for qa in d.qa:
            assert qa.answer and qa.answer in d.text, (d.id, qa)
            assert d.title in qa.question
        assert len({qa.question for qa in d.qa}) == len(d.qa)


def test_held_out_entities_appear_in_no_training_article():
    train, held = split_articles(articles(120))
    assert len(train) + len(held) == 120 and 20 <= len(held) <= 40
    assert {(d.kind, d.lang) for d in held} == {(k, lang) for k in ("country", "person", "product")
                                                for lang in ("en", "zh")}
    training_text = "\n".join(d.text for d in train)
    for d in held:
        assert d.title not in training_text, d.title


def test_the_chunker_keeps_each_fact_under_its_headings(workspace):
    tokenizer = Tokenizer.load(workspace / "tokenizer")
    for d in articles(12):
        chunks = chunk_document(d.text, d.id, tokenizer, ChunkParams(max_tokens=64))
        assert "".join(c.text for c in chunks) == d.text
        assert all(c.headings[0] == d.title for c in chunks)
        for qa in d.qa:  # each answer sits whole inside one chunk
            assert any(qa.answer in c.text for c in chunks), (d.id, qa.answer)


def test_sections_are_the_chunks_retrieval_makes(workspace):
    """Reading-comprehension training shows the model `Article.sections()`; retrieval gives it the chunker's
    chunks: the two must be the same text under the same headings."""
    tokenizer = Tokenizer.load(workspace / "tokenizer")
    for d in articles(30):
        chunks = chunk_document(d.text, f"{d.id}.md", tokenizer, ChunkParams(max_tokens=256))
        assert [(c.text, list(c.headings)) for c in chunks] == [(s["text"], s["headings"]) for s in d.sections()]
        for qa in d.qa:
            assert qa.answer in d.answer_section(qa)["text"]


def test_drills_repeat_names_with_other_facts_and_avoid_held_out_entities():
    _, held = split_articles(articles(240))
    drills = drill_articles(600, seed=0, avoid=held)
    assert drills == drill_articles(600, seed=0, avoid=held)
    assert {(d.kind, d.lang) for d in drills} == {(d.kind, d.lang) for d in held}
    for d in drills:
        assert not any(h.title in d.text for h in held), d.title
        assert all(qa.answer in d.answer_section(qa)["text"] for qa in d.qa)
    by_title = {}
    for d in drills:
        by_title.setdefault(d.title, set()).add(d.text)
    assert any(len(texts) > 1 for texts in by_title.values())  # a name comes back with other facts


def test_the_corpus_holds_documents_and_reading_conversations(workspace):
    """write_corpus (scale 0.25 in the workspace): documents split by entity; the training articles are
    pretraining text followed by their questions and answers, and reading-comprehension conversations use the
    grounded-prompt format, every answer copied from a chunk in the prompt; no held-out entity is named in any
    training file."""
    from astrai_ds.data.chat import RAG_SYSTEM
    from astrai_ds.data.corpus.reading import MAX_TURNS, READING_CONVERSATIONS

    corpus = workspace / "corpus"
    read = lambda name: [json.loads(line) for line in (corpus / name).read_text(encoding="utf-8").splitlines()]
    train, held = read("documents.jsonl"), read("documents_eval.jsonl")
    assert {d["split"] for d in train} == {"train"} and {d["split"] for d in held} == {"eval"}
    assert len(held) >= 40 and all(d["qa"] for d in held)
    training_files = {name: (corpus / name).read_text(encoding="utf-8")
                      for name in ("pretrain.jsonl", "sft.jsonl", "dpo.jsonl", "documents.jsonl", "reading.jsonl")}
    for d in held:
        for name, text in training_files.items():
            assert d["title"] not in text, (d["title"], name)
    pretrain = "\n".join(json.loads(line)["text"] for line in training_files["pretrain.jsonl"].splitlines())
    for d in train:
        assert d["text"] + "\nQuestion: " in pretrain and f"Answer: {d['qa'][0]['answer']}" in pretrain

    reading = [r["messages"] for r in read("sft.jsonl") if r["messages"][0]["content"] == RAG_SYSTEM]
    assert len(reading) == round(READING_CONVERSATIONS * 0.25)
    # reading.jsonl: the same conversations alone (a pretrained model is fine-tuned on them)
    assert sorted(map(json.dumps, reading)) == sorted(json.dumps(r["messages"]) for r in read("reading.jsonl"))
    sizes, turns = set(), set()
    for messages in reading:
        context, _, question = messages[1]["content"].partition("\n\nQuestion: ")
        assert context.startswith("Context:\n[1] ") and question
        sizes.add(len(context.split("\n\n[")))
        turns.add(len(messages) // 2)
        assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * (len(messages) // 2)
        for user, assistant in zip(messages[1::2], messages[2::2]):
            assert user["content"].startswith(("Context:", "Question: "))
            assert assistant["content"] in context, (assistant["content"], context)
    assert sizes == {1, 2, 3, 4} and turns == set(range(1, MAX_TURNS + 1))
