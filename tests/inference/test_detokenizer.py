"""Streaming detokenization: whole characters only, stop strings cut, same text as a full decode."""

import random

import pytest

from astrai_ds.data.tokenizer import Tokenizer, train_tokenizer
from astrai_ds.inference.detokenizer import IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "苹果的中文是苹果。我们今天去公园散步，天气很好。",
    "机器学习模型需要大量的数据来训练，中文和英文都很重要。",
    "Tokenizers split text into pieces; emoji 😀 and café stay intact.",
]
# Pieces of test text: many are not in the corpus, so their characters split into byte tokens.
PIECES = ["the", " fox", " dog", "Hello", " world", "你好", "世界", "苹果", "天气很好", "龘", "鬱", "。", "，",
          "😀", "🎉", "👩‍💻", "é", " ", "\n", "12", "<eos>", "ab", "abc"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("detok")
    (d / "c.txt").write_text("\n".join(CORPUS * 10), encoding="utf-8")
    train_tokenizer([d / "c.txt"], 400, d / "tok", progress=False)
    return Tokenizer.load(d / "tok")


def expected_cut(text: str, stops: list[str]) -> str:
    """The text before the first stop string to be complete (ties: the longest), found the naive way."""
    for end in range(len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(len(s) for s in done)]
    return text


def stream(tok, ids, stops=(), **kw) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, stops, **kw)
    pieces = [d.add(i) for i in ids]
    pieces.append(d.finish())
    return pieces, d


def test_random_mixed_text_matches_full_decode_cut_at_stop(tok):
    rng = random.Random(0)
    n_stopped = 0
    for _ in range(300):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 25)))
        ids = tok.encode(text)
        full = tok.decode(ids)
        assert full == text
        stops = []
        for _ in range(rng.randint(0, 3)):
            if rng.random() < 0.6:  # a slice of the text, so it really occurs, often across tokens
                a = rng.randrange(len(text))
                stops.append(text[a:a + rng.randint(1, 4)])
            else:
                stops.append("".join(rng.choice(PIECES) for _ in range(2)))
        pieces, d = stream(tok, ids, stops)
        want = expected_cut(full, stops)
        assert "".join(pieces) == want, (text, stops)
        assert all("\ufffd" not in p for p in pieces), pieces
        assert d.stopped == any(s in full for s in stops)
        n_stopped += d.stopped
    assert 100 < n_stopped < 300  # both cases were exercised


def test_without_stops_emits_every_complete_character_at_once(tok):
    ids = tok.encode("天气很好😀 龘鬱 hello 👩‍💻。")
    d, text = IncrementalDetokenizer(tok), ""
    for k, i in enumerate(ids, 1):
        text += d.add(i)
        so_far = tok.decode(ids[:k])
        if not so_far.endswith("\ufffd"):  # the first k tokens end on a character boundary
            assert text == so_far
        else:
            assert so_far.startswith(text) and len(so_far) - len(text) <= 2
    assert d.finish() == "" and text == tok.decode(ids)


def test_split_character_is_held_until_complete(tok):
    ids = tok.encode("龘")  # not in the corpus: 3 byte tokens
    assert len(ids) == 3
    d = IncrementalDetokenizer(tok)
    assert [d.add(i) for i in ids] == ["", "", "龘"]


def test_stop_spanning_tokens_and_starting_in_held_text(tok):
    text = "hello 你好世界 and more"
    ids = tok.encode(text)
    pieces, d = stream(tok, ids, ["好世界"])
    assert d.stopped and "".join(pieces) == "hello 你"
    assert d.add(ids[0]) == "" and d.finish() == ""  # nothing more once stopped


def test_possible_stop_prefix_is_held_then_released(tok):
    d = IncrementalDetokenizer(tok, ["fox jumps"])
    pieces = [d.add(i) for i in tok.encode("the fox")]
    assert "".join(pieces) == "the "  # "fox" could still become "fox jumps"
    assert not d.stopped
    assert d.finish() == "fox"


def test_prefix_released_once_the_text_diverges(tok):
    d = IncrementalDetokenizer(tok, ["fox jumps"])
    out = "".join(d.add(i) for i in tok.encode("the fox runs"))
    assert out == "the fox runs" and not d.stopped


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("你好") + [tok.im_end_id] + tok.encode("ok") + [tok.eos_id]
    assert "".join(stream(tok, ids)[0]) == "你好ok"
    assert "".join(stream(tok, ids, skip_special_tokens=False)[0]) == "你好<|im_end|>ok<eos>"
    # A special token's text can be a stop string when specials are kept.
    pieces, d = stream(tok, ids, ["<|im_end|>"], skip_special_tokens=False)
    assert d.stopped and "".join(pieces) == "你好"


def test_invalid_bytes_at_the_end_flush_like_decode(tok):
    lone = tok.encode("龘")[:2]  # a character cut short: the model could generate this
    ids = tok.encode("ok") + lone
    pieces, d = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) and pieces[-1].endswith("\ufffd")


@pytest.mark.parametrize("text, stops, want", [
    # The inner stop is complete first, though the other starts earlier. The last token ("苹果", "ick" in
    # this tokenizer) completes both stops in the same step, so the order within one step is tested.
    ("x苹果", ["x苹果", "苹"], "x"),
    ("xquick", ["uick", "ic"], "xqu"),
    ("xab", ["b", "ab"], "x"),  # both end at once: the longer one cuts
])
def test_first_stop_is_the_first_complete(tok, text, stops, want):
    assert expected_cut(text, stops) == want
    for ids in (tok.encode(text), [t for ch in text for t in tok.encode(ch)]):  # two different token splits
        pieces, d = stream(tok, ids, stops)
        assert d.stopped and "".join(pieces) == want
