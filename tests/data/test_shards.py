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


def _write_masked(out, docs, shard_tokens=10):
    w = ShardWriter(out, 1000, {"stage": "sft"}, shard_tokens=shard_tokens, masks=True)
    for ids, mask in docs:
        w.add(ids, mask)
    return w.close()


def test_masks_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    docs = [(rng.integers(0, 1000, size=n), rng.integers(0, 2, size=n)) for n in (3, 7, 4, 12, 1, 5, 9)]
    index = _write_masked(tmp_path, docs)
    assert len(index["shards"]) > 3 and all(s["masks"] == f"masks_{i:05d}.bin" for i, s in enumerate(index["shards"]))
    assert (tmp_path / "masks_00000.bin").stat().st_size == index["shards"][0]["num_tokens"]  # one byte per token
    shards = TokenShards(tmp_path)
    assert shards.has_masks
    tokens, masks = np.concatenate([d[0] for d in docs]), np.concatenate([d[1] for d in docs])
    for start in range(len(tokens)):
        for length in (0, 1, 6, 13):
            if start + length <= len(tokens):
                window = shards.read_mask(start, length)
                assert window.dtype == np.uint8
                np.testing.assert_array_equal(window, masks[start:start + length])
                np.testing.assert_array_equal(shards.read(start, length), tokens[start:start + length])
    np.testing.assert_array_equal(shards.document_lengths(), [len(d[0]) for d in docs])


def test_pt_shards_are_unchanged_and_have_no_masks(tmp_path):
    index = _write(tmp_path, [[1, 2, 3]])
    assert "masks" not in index["shards"][0] and not list(tmp_path.glob("masks_*"))
    shards = TokenShards(tmp_path)
    assert not shards.has_masks
    with pytest.raises(DataError, match="no loss mask.*--stage sft"):
        shards.read_mask(0, 1)


def test_truncated_mask_error(tmp_path):
    _write_masked(tmp_path, [(list(range(8)), [0, 1] * 4), (list(range(8)), [1] * 8)], shard_tokens=8)
    path = tmp_path / "masks_00001.bin"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"mask shard .*masks_00001\.bin.*expected 8 bytes.*has 5 bytes.*prepare"):
        TokenShards(tmp_path)
    path.unlink()
    with pytest.raises(DataError, match=r"masks_00001\.bin.*missing"):
        TokenShards(tmp_path)


def test_mask_arguments_are_checked(tmp_path):
    w = ShardWriter(tmp_path / "a", 100, {}, masks=True)
    with pytest.raises(ValueError, match="pass add\\(ids, mask\\)"):
        w.add([1, 2])
    with pytest.raises(ValueError, match="shape"):
        w.add([1, 2], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        w.add([1, 2], [0, 2])
    with pytest.raises(ValueError, match="no masks"):
        ShardWriter(tmp_path / "b", 100, {}).add([1, 2], [0, 1])


def test_remove_shards_removes_masks(tmp_path):
    _write_masked(tmp_path, [([1, 2], [0, 1])])
    remove_shards(tmp_path)
    assert list(tmp_path.iterdir()) == []
