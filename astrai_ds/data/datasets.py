"""Training samples over token shards, and their collate functions (torch tensors)."""

from __future__ import annotations

import numpy as np
import torch

from astrai_ds.data.shards import TokenShards
from astrai_ds.errors import DataError


class PretrainDataset(torch.utils.data.Dataset):
    """Fixed windows over the concatenated token stream: sample i is tokens [i*seq_len, (i+1)*seq_len + 1),
    so input = sample[:-1] and target = sample[1:]. Windows cross document boundaries (documents are
    separated by bos/eos) and the last window's extra token overlaps the next window's first."""

    def __init__(self, shards: TokenShards, seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.shards = shards
        self.seq_len = seq_len
        self._len = (shards.num_tokens - 1) // seq_len if shards.num_tokens > 0 else 0
        if self._len == 0:
            raise DataError(
                f"the corpus at {shards.path} has {shards.num_tokens} tokens, too few for one window of "
                f"seq_len {seq_len} (needs {seq_len + 1}); add data or lower seq_len"
            )

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        """(seq_len + 1,) int64 token ids."""
        i = int(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} is out of range for {self._len} samples")
        return self.shards.read(i * self.seq_len, self.seq_len + 1)


def collate_pretrain(samples: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Stack windows into {"input_ids": (B, T), "labels": (B, T)} int64 tensors, labels shifted by one."""
    batch = torch.from_numpy(np.stack(samples).astype(np.int64, copy=False))  # (B, T + 1)
    return {"input_ids": batch[:, :-1].contiguous(), "labels": batch[:, 1:].contiguous()}
