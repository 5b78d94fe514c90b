"""Micro-batches for one rank: the sampler picks indices, the dataset reads them from the memory-mapped
shards, collate stacks them. No DataLoader workers: reading a few windows from a memmap is cheap, and on
a small machine every core is busy training."""

from __future__ import annotations

import torch

from astrai_ds.data.sampler import DistributedBatchSampler


class BatchIterator:
    def __init__(self, dataset, sampler: DistributedBatchSampler, collate, device: torch.device):
        self.dataset, self.sampler, self.collate, self.device = dataset, sampler, collate, device

    def next(self) -> dict:
        batch = self.collate([self.dataset[i] for i in self.sampler.next_indices()])
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.sampler.load_state_dict(sd)
