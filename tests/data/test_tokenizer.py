import json
import unicodedata

import pytest

from astrai_ds.data.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, train_tokenizer
from astrai_ds.errors import DataError

ROUND_TRIP = [
    "Hello, world! 你好，世界！",
    "emoji 😀👍🏽 flags 🇨🇳🇬🇧 and ZWJ 👨‍👩‍👧",
    "combining: e\u0301 a\u0308 (not NFC) vs é ä",
    "Tabs\tand\r\nCRLF  double  spaces   ",
    "<eos> <|im_start|> look like special tokens but are text",
    "数学：12345 + 67890 = 80235。",
    "\u200b zero width, \u00a0 nbsp, \U0001F600, rare 𠀀 CJK ext B",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_batch_matches_encode(tokenizer):
    assert tokenizer.encode_batch(ROUND_TRIP) == [tokenizer.encode(t) for t in ROUND_TRIP]


def test_special_token_ids(tokenizer):
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(16))
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (3, 4)
    assert MIN_VOCAB_SIZE < tokenizer.vocab_size <= 512


def test_special_strings_are_text_unless_allowed(tokenizer):
    assert tokenizer.eos_id not in tokenizer.encode("a<eos>")
    assert tokenizer.encode("<|im_start|>user", allow_special=True)[0] == tokenizer.im_start_id
    ids = [tokenizer.bos_id] + tokenizer.encode("hi") + [tokenizer.eos_id]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos>hi<eos>"


def test_digits_split_individually(tokenizer):
    ids = tokenizer.encode("2024")
    assert [tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_hash_and_path(tokenizer, tokenizer_dir):
    again = Tokenizer.load(tokenizer_dir / "tokenizer.json")
    assert again.hash == tokenizer.hash and len(tokenizer.hash) == 64
    assert again.path == tokenizer_dir / "tokenizer.json"


def test_training_is_deterministic_and_normalizes(corpus_files, tokenizer, tmp_path):
    path = train_tokenizer(corpus_files, 512, tmp_path)
    assert Tokenizer.load(path).hash == tokenizer.hash
    # Training text is NFC-normalized, so a decomposed "é" does not change what is learned.
    nfd = tmp_path / "nfd.txt"
    nfd.write_text(unicodedata.normalize("NFD", corpus_files[0].read_text(encoding="utf-8")), encoding="utf-8")
    b = train_tokenizer([nfd, corpus_files[1]], 512, tmp_path / "b")
    assert Tokenizer.load(b).hash == tokenizer.hash


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="astrai-ds tokenizer --input"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="damaged"):
        Tokenizer.load(tmp_path)


def test_train_errors(tmp_path, corpus_files):
    with pytest.raises(DataError, match=str(MIN_VOCAB_SIZE)):
        train_tokenizer(corpus_files, 100, tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer([empty], 512, tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": "no"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2"):
        train_tokenizer([bad], 512, tmp_path)
    with pytest.raises(DataError, match="unknown file extension"):
        (tmp_path / "x.csv").write_text("a\n")
        train_tokenizer([tmp_path / "x.csv"], 512, tmp_path)
