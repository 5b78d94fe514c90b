"""The retrieval documents of the built-in corpus: deterministic, in both languages, with headings; every answer
is written in its article; held-out entities appear in no training article; the chunker keeps their structure."""

from __future__ import annotations

from astrai_ds.data.corpus.documents import articles, split_articles
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
