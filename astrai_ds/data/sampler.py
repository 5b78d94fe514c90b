"""Resumable distributed batch sampler: each rank draws its disjoint micro-batch of every global step."""

from __future__ import annotations

import numpy as np

from astrai_ds.errors import DataError


class DistributedBatchSampler:
    """Global micro-step k of an epoch takes entries [k*G, (k+1)*G) of the epoch's order, G =
    micro_batch_size * world_size; rank r gets the r-th contiguous chunk of micro_batch_size of them. The
    order is a permutation seeded by seed + epoch (or 0..n-1 without shuffle). The tail of an epoch that
    cannot fill a whole global micro-step is skipped, and the next epoch starts.

    Every rank holds the same state, and `consumed` counts samples of all ranks, so a run can also resume
    with a different world size or micro-batch size: it continues from the same position of the same order.
    Draw indices (`next_indices`) only when a step consumes them: state_dict() records the position after
    the last draw, so indices drawn ahead of training would be skipped on resume.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler shape: micro_batch_size={micro_batch_size}, rank={rank}, "
                             f"world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        global_batch = micro_batch_size * world_size
        if num_samples < global_batch:
            raise DataError(
                f"the dataset has {num_samples} samples, fewer than one global micro-step of {global_batch} "
                f"(micro_batch_size {micro_batch_size} x world_size {world_size}); add data, or lower "
                f"micro_batch_size or seq_len"
            )
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0
        self._consumed = 0  # samples (all ranks) consumed in the current epoch
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Global micro-steps in one epoch."""
        return self.num_samples // self.global_batch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def consumed_total(self) -> int:
        """Samples consumed by all ranks since the start, over all epochs."""
        return self._epoch * self.steps_per_epoch * self.global_batch + self._consumed

    def _order_for_epoch(self) -> np.ndarray:
        # The whole epoch's order is kept: 8 bytes per sample (80 MB for 10M samples).
        if self._order_epoch != self._epoch:
            if self.shuffle:
                self._order = np.random.default_rng(self.seed + self._epoch).permutation(self.num_samples)
            else:
                self._order = np.arange(self.num_samples, dtype=np.int64)
            self._order_epoch = self._epoch
        return self._order

    def next_indices(self) -> list[int]:
        """This rank's micro-batch for the next global micro-step."""
        if self._consumed + self.global_batch > self.num_samples:
            self._epoch += 1
            self._consumed = 0
        start = self._consumed + self.rank * self.micro_batch_size
        indices = self._order_for_epoch()[start:start + self.micro_batch_size].tolist()
        self._consumed += self.global_batch
        return indices

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self._epoch,
            "consumed": self._consumed,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "micro_batch_size": self.micro_batch_size,
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["num_samples"] != self.num_samples:
            raise DataError(
                f"the sampler state was saved with {sd['num_samples']} samples but the dataset now has "
                f"{self.num_samples}: the data or seq_len changed since the checkpoint; use the same prepared "
                f"data, or start a fresh run"
            )
        if not 0 <= sd["consumed"] <= self.num_samples or sd["epoch"] < 0:
            raise DataError(f"the sampler state is damaged: epoch {sd['epoch']}, consumed {sd['consumed']}")
        self.seed = int(sd["seed"])
        self._epoch = int(sd["epoch"])
        self._consumed = int(sd["consumed"])
        self._order_epoch = -1  # the order depends on the seed and epoch just loaded
