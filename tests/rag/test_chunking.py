"""Chunking: the chunks of a document cover it exactly, in order, none empty, none over max_tokens of the
model's tokenizer; headings give each chunk its path and stay with the text under them; tables are cut between
rows, each piece under the table's header rows; sentences split in both languages but not inside quotes or
numbers; semantic breaks fall where the topic changes."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.rag.chunking import ChunkError, ChunkParams, chunk_document, sections, sentences

DOC = """# 星河共和国

星河共和国是一个虚构的国家。它的首都是银湾市，人口约为 3.5 百万。“这里的冬天很长。你会喜欢的！”导游说。
The republic exports glass and violins. Its currency is the lumen; one lumen is 2.75 crowns. Visitors say it is calm.

## 历史

- 建国于 1821 年。
- The first president was Ada Lin.
- 第三任总统推行了教育改革；改革持续了十年。

```python
def capital():
    return "银湾市"  # 不会被切开。这里也不会。
```

### 近代

A very long sentence that keeps going and going without any end in sight because it lists many things such as apples, pears, plums, cherries, grapes, melons, lemons, limes, oranges, figs, dates, kiwis and mangoes, all grown in the southern valleys of the republic
最后一段没有句号
"""


@pytest.fixture(scope="module")
def tokenizer(workspace):
    return Tokenizer.load(workspace / "tokenizer")


def check_cover(doc: str, chunks, tokenizer, max_tokens: int, markdown: bool = True) -> None:
    """The chunks' spans tile the document; a chunk's text is its span, after a table's header rows when it
    starts inside the table; none is blank, over the limit, or Markdown headings alone (unless the limit leaves
    no room for more)."""
    position = 0
    for c in chunks:
        header = c.text[:len(c.text) - (c.end - c.start)]
        assert c.start == position and c.text.endswith(doc[c.start:c.end]) and c.text.strip(), c
        assert header == "" or (header in doc and _TABLE_HEADER.fullmatch(header)), c
        assert c.n_tokens == len(tokenizer.encode(c.text)) <= max_tokens, c
        position = c.end
    assert position == len(doc)
    for c in chunks:  # whole headings alone only where the limit leaves no room for a character of their text
        headings = all(not line.strip() or line.startswith("#") for line in c.text.splitlines())
        under = re.match(r"(?:[ \t]*\n|#.*\n)*\s*[^\s#]\s*", doc[c.end:])  # up to a character of text
        if markdown and headings and c.text.endswith("\n") and under:
            assert len(tokenizer.encode(c.text + under.group())) > max_tokens, c


_TABLE_HEADER = re.compile(r"\|.*\n\|[-:| ]+\|\n")


@pytest.mark.parametrize("max_tokens", [6, 16, 40, 512])
def test_chunks_cover_the_document_within_the_limit(tokenizer, max_tokens):
    chunks = chunk_document(DOC, "doc.md", tokenizer, ChunkParams(max_tokens=max_tokens))
    check_cover(DOC, chunks, tokenizer, max_tokens)
    if max_tokens == 512:  # one chunk per section when everything fits
        assert [c.headings for c in chunks] == [("星河共和国",), ("星河共和国", "历史"), ("星河共和国", "历史", "近代")]


def test_heading_paths_and_code_blocks(tokenizer):
    chunks = chunk_document(DOC, "doc.md", tokenizer, ChunkParams(max_tokens=64))
    code = next(c for c in chunks if "不会被切开" in c.text)
    assert code.headings == ("星河共和国", "历史")
    assert 'return "银湾市"  # 不会被切开。这里也不会。\n' in code.text  # code is cut at lines, not sentence ends
    assert all(c.headings[-1] == "近代" for c in chunks if "mangoes" in c.text or "最后一段" in c.text)
    blocks = sections(DOC, markdown=True)
    assert [s.headings for s in blocks][:2] == [("星河共和国",), ("星河共和国", "历史")]
    assert sum(kind == "code" for s in blocks for _, kind in s.blocks) == 1


def test_sentences_in_both_languages():
    text = "他说：“走吧。马上！”然后离开了。价格是 3.5 元；很便宜。Dr. Smith paid $2.50 today. Then he left! Ok?"
    got = [text[a:b] for a, b in sentences(text, (0, len(text)))]
    assert got == ["他说：“走吧。马上！”然后离开了。", "价格是 3.5 元；", "很便宜。", "Dr. ", "Smith paid $2.50 today. ",
                   "Then he left! ", "Ok?"]
    assert "".join(got) == text
    text = 'She said "Stop. Now." and left. 完'
    assert [text[a:b] for a, b in sentences(text, (0, len(text)))] == ['She said "Stop. Now." and left. ', "完"]


def test_plain_text_splits_by_paragraph(tokenizer):
    doc = "First paragraph. Still first.\n\n\nSecond paragraph\n# not a heading in plain text\n\nThird."
    chunks = chunk_document(doc, "a.txt", tokenizer, ChunkParams(max_tokens=12), markdown=False)
    check_cover(doc, chunks, tokenizer, 12, markdown=False)
    assert all(c.headings == () for c in chunks)


def test_a_limit_below_one_character_is_a_clear_error(tokenizer):
    n = len(tokenizer.encode("🎉"))
    assert n > 1
    with pytest.raises(ChunkError, match=rf"doc.md: the text '🎉' at offset 0 is {n} tokens.*max_tokens 1;"):
        chunk_document("🎉🎉", "doc.md", tokenizer, ChunkParams(max_tokens=1))


def test_random_documents_keep_every_invariant(tokenizer):
    rng = random.Random(0)
    parts = ["# 标题", "## Sub title", "- item one", "1. 第一项", "```\ncode line。\nmore\n```", "",
             "短句。", "A sentence. Another one!", "“引号里。不切。”后面。", "3.14159 is pi.", "🎉🎉🎉",
             "x" * 80, "很长的中文句子" * 15, "   ", "\t", TABLE, "| a | b |\n|---|---|\n| 1. x. | 2. y |"]
    for trial in range(100):
        doc = "\n".join(rng.choice(parts) for _ in range(rng.randrange(1, 30)))
        if rng.random() < 0.5:
            doc += "\n"
        if not doc.strip():
            continue
        max_tokens = rng.choice([12, 20, 64, 100])
        markdown = rng.random() < 0.8
        try:
            chunks = chunk_document(doc, f"t{trial}", tokenizer, ChunkParams(max_tokens=max_tokens), markdown=markdown)
        except ChunkError as e:  # the one limit: a character with the whitespace after it is over max_tokens
            assert "the whitespace around it are never cut apart" in str(e) and max_tokens <= 20, e
            continue
        check_cover(doc, chunks, tokenizer, max_tokens, markdown)


def test_semantic_breaks_fall_between_topics(tokenizer):
    cats = ["Cats sleep all day.", "A cat likes fish.", "Cats purr when happy.", "My cat chases mice."]
    money = ["Banks lend money.", "Interest rates rose.", "Money moves markets.", "Banks hold deposits."]
    doc = " ".join(cats + money)

    def embed(texts):  # counts of topic words: a stand-in for the model's embeddings
        return np.array([[t.lower().count("cat"), t.lower().count("bank") + t.lower().count("money")
                          + t.lower().count("interest")] for t in texts], dtype=np.float32) + 0.01

    params = ChunkParams(max_tokens=512, semantic=True, window=0, percentile=85)
    chunks = chunk_document(doc, "s.txt", tokenizer, params, markdown=False, embed=embed)
    check_cover(doc, chunks, tokenizer, 512)
    assert [c.text.strip() for c in chunks] == [" ".join(cats), " ".join(money)]
    # without semantic breaks everything fits in one chunk
    assert len(chunk_document(doc, "s.txt", tokenizer, ChunkParams(max_tokens=512), markdown=False)) == 1


def test_a_heading_stays_with_the_text_under_it(tokenizer):
    body = "Vela is a mountain country with long winters. Its capital is Orin, a city of glass makers."
    doc = f"# Vela\n\n## Geography\n\n{body}\n\n## Trade?\n\nGlass and violins. They go north.\n\n## See also\n"
    for max_tokens in (24, 48, 512):  # (24: the headings and a few words of the first sentence)
        chunks = chunk_document(doc, "vela.md", tokenizer, ChunkParams(max_tokens=max_tokens))
        check_cover(doc, chunks, tokenizer, max_tokens)
        # a heading with nothing under it joins the next section; the last one joins the chunk before it
        assert chunks[0].text.startswith("# Vela\n\n## Geography\n\nVela is"), chunks[0]
        assert chunks[0].headings == ("Vela", "Geography") and chunks[-1].text.endswith("north.\n\n## See also\n")
        assert {c.headings for c in chunks} == {("Vela", "Geography"), ("Vela", "Trade?")}
    semantic = chunk_document(doc, "vela.md", tokenizer, ChunkParams(max_tokens=48, semantic=True, window=0),
                              embed=lambda texts: np.random.default_rng(0).normal(size=(len(texts), 8)))
    check_cover(doc, semantic, tokenizer, 48)


TABLE = """| City | Country | People |
|:-----|---------|-------:|
| Orin | Vela | 3.5 million |
| Venlu | Senofi | 81 million. Most live by the sea. |
| 银湾市 | 星河共和国 | 一百万。很多。 |
| Kiro | Vela | 12,000 |"""


def test_a_table_is_cut_between_rows_under_its_header(tokenizer):
    doc = f"# Cities\n\nThe largest cities.\n\n{TABLE}\n\nAfter the table.\n"
    lines = TABLE.splitlines(keepends=True)
    header, rows = "".join(lines[:2]), [line.rstrip("\n") for line in lines[2:]]
    h = len(tokenizer.encode(header))
    for max_tokens in (h + 11, 2 * h, 2 * h + 30):  # the header rows repeat when they take at most half the limit
        chunks = chunk_document(doc, "cities.md", tokenizer, ChunkParams(max_tokens=max_tokens))
        check_cover(doc, chunks, tokenizer, max_tokens)
        pieces = [c for c in chunks if any(row in c.text for row in rows)]
        assert len(pieces) > 1, max_tokens  # the table is too long for one chunk
        for c in pieces:  # only whole rows
            assert all(line in rows or not line.startswith("|") for line in c.text.replace(header, "").splitlines()), c
        repeated = [c.text.startswith(header) for c in pieces[1:]]
        assert repeated == [max_tokens >= 2 * h] * len(repeated), (max_tokens, h)
        assert sum(c.text.count(header) for c in chunks) == (len(pieces) if max_tokens >= 2 * h else 1)
    # not a table: no delimiter row, or one with another number of cells
    assert [kind for s in sections("| a | b |\n| c | d |\n", True) for _, kind in s.blocks] == ["text"]
    assert [kind for s in sections("| a | b |\n|---|\n| c |\n", True) for _, kind in s.blocks] == ["text"]
    assert [kind for s in sections(doc, True) for _, kind in s.blocks] == ["heading", "text", "table", "text"]
    # a table ends at a blank line, a heading, a fence or a list item
    assert [kind for s in sections("| a |\n|---|\n| 1 |\n- item\n", True) for _, kind in s.blocks] == ["table", "text"]
