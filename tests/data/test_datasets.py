import numpy as np
import pytest
import torch

from astrai_ds.data.datasets import PretrainDataset, collate_pretrain
from astrai_ds.data.shards import ShardWriter, TokenShards
from astrai_ds.errors import DataError


def _shards(path, n_tokens, shard_tokens=7):
    w = ShardWriter(path, 1000, {"stage": "pt"}, shard_tokens=shard_tokens)
    for start in range(0, n_tokens, 5):
        w.add(np.arange(start, min(start + 5, n_tokens)))
    w.close()
    return TokenShards(path)


def test_windows(tmp_path):
    ds = PretrainDataset(_shards(tmp_path, 33), seq_len=8)
    assert len(ds) == 4  # (33 - 1) // 8
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds[i], np.arange(i * 8, i * 8 + 9))
    assert ds[-1].tolist() == list(range(24, 33))
    with pytest.raises(IndexError):
        ds[4]
    batch = collate_pretrain([ds[0], ds[2]])
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == list(range(16, 24))
    assert batch["labels"][1].tolist() == list(range(17, 25))


def test_too_small(tmp_path):
    shards = _shards(tmp_path, 8)
    assert len(PretrainDataset(shards, seq_len=7)) == 1
    with pytest.raises(DataError, match="too few"):
        PretrainDataset(shards, seq_len=8)
