import json

import numpy as np
import pytest

from astrai_ds.data.shards import ShardWriter, TokenShards, dtype_for, remove_shards
from astrai_ds.errors import DataError


def _write(out, docs, vocab_size=1000, shard_tokens=10, meta=None):
    w = ShardWriter(out, vocab_size, meta or {"stage": "pt"}, shard_tokens=shard_tokens)
    for d in docs:
        w.add(d)
    return w.close()


def test_round_trip_across_shard_boundaries(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=n) for n in (3, 7, 4, 12, 1, 5, 9)]
    index = _write(tmp_path, docs, meta={"stage": "pt", "seq_len": 8, "tokenizer_hash": "abc"})
    stream = np.concatenate(docs)
    assert index["num_tokens"] == len(stream) and index["num_documents"] == len(docs)
    assert len(index["shards"]) > 3  # tiny shard_tokens: many shards
    assert all(s["num_tokens"] <= 10 or s["num_documents"] == 1 for s in index["shards"])

    shards = TokenShards(tmp_path)
    assert shards.dtype == np.uint16 and shards.num_tokens == len(stream)
    assert shards.meta == {"stage": "pt", "seq_len": 8, "tokenizer_hash": "abc"}
    assert json.loads((tmp_path / "index.json").read_text())["tokenizer_hash"] == "abc"
    for start in range(len(stream)):
        for length in (0, 1, 5, 13):
            if start + length <= len(stream):
                window = shards.read(start, length)
                assert window.dtype == np.int64
                np.testing.assert_array_equal(window, stream[start:start + length])
    np.testing.assert_array_equal(shards.document_starts(), np.cumsum([0] + [len(d) for d in docs[:-1]]))
    with pytest.raises(IndexError):
        shards.read(len(stream) - 2, 3)


def test_dtype_choice(tmp_path):
    assert dtype_for(65536) == "uint16" and dtype_for(65537) == "uint32"
    _write(tmp_path / "a", [[0, 65535]], vocab_size=65536)
    _write(tmp_path / "b", [[0, 70000]], vocab_size=70001)
    assert TokenShards(tmp_path / "a").dtype == np.uint16
    b = TokenShards(tmp_path / "b")
    assert b.dtype == np.uint32 and b.read(0, 2).tolist() == [0, 70000]
    assert (tmp_path / "b" / "tokens_00000.bin").stat().st_size == 8


def test_out_of_vocab_id_is_rejected(tmp_path):
    w = ShardWriter(tmp_path, 100, {})
    with pytest.raises(DataError, match="outside the vocabulary"):
        w.add([5, 100])


def test_truncated_shard_error(tmp_path):
    _write(tmp_path, [list(range(8)), list(range(8))], shard_tokens=8)
    path = tmp_path / "tokens_00001.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"tokens_00001\.bin.*expected 16 bytes.*has 13 bytes.*prepare"):
        TokenShards(tmp_path)


def test_missing_index_error(tmp_path):
    with pytest.raises(DataError, match="astrai-ds prepare"):
        TokenShards(tmp_path)


def test_remove_and_rewrite(tmp_path):
    _write(tmp_path, [[1, 2, 3]] * 5, shard_tokens=3)
    with pytest.raises(DataError, match="already holds"):
        ShardWriter(tmp_path, 1000, {})
    (tmp_path / "notes.txt").write_text("kept")
    remove_shards(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    _write(tmp_path, [[4, 5]])
    assert TokenShards(tmp_path).read(0, 2).tolist() == [4, 5]


def test_pickle_does_not_copy_shards(tmp_path):
    import pickle

    _write(tmp_path, [list(range(50))], shard_tokens=100)
    shards = TokenShards(tmp_path)
    shards.read(0, 5)  # opens the memmaps
    clone = pickle.loads(pickle.dumps(shards))
    assert len(pickle.dumps(shards)) < 2000
    assert clone.read(10, 3).tolist() == [10, 11, 12]
