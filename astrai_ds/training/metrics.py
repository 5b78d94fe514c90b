"""Throughput accounting: tokens/s and MFU against a measured peak."""

from __future__ import annotations

import time

import torch


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int | None = None, iters: int = 8,
                       budget_s: float = 1.0) -> float:
    """Measure this process's dense matmul peak in FLOP/s with a square `dtype` matmul on `device`.

    There is no trustworthy datasheet peak for a CPU (it depends on the cores, threads and ISA), so
    MFU is reported against what this device actually reaches on a large matmul, measured at start-up.
    Where one product takes longer than the budget allows (bf16 on a CPU without native bf16 runs at
    under 1 GFLOP/s a core: seconds for one 1024^3 product), the matrices shrink until it fits, so that
    start-up never waits on the measurement.
    """
    size = size or (8192 if device.type == "cuda" else 1024)
    per_product = budget_s / (iters + 2)
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        t0 = time.perf_counter()
        a @ b  # warm-up: kernel selection, page faults
        _sync(device)
        took = time.perf_counter() - t0
        if took <= per_product or size <= 128:
            break
        # the work grows with size^3: aim at half the time allowed a product
        size = max(128, int(size * (per_product / 2 / took) ** (1 / 3)) // 64 * 64)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Tokens/s and MFU over the steps since the last `rate()` call.

    Tokens are the non-padding tokens through the policy (all ranks); FLOPs are what the steps executed (the
    policy's forward and backward over the padded batch, recomputation, a live reference's forward), against
    `peak_flops`, the measured peak of all ranks together: so MFU is the mean over the data-parallel ranks.
    """

    def __init__(self, peak_flops: float):
        self.peak_flops = peak_flops
        self._tokens, self._flops, self._t0 = 0.0, 0.0, time.perf_counter()

    def add(self, tokens: float, flops: float) -> None:
        self._tokens += tokens
        self._flops += flops

    def rate(self) -> tuple[float, float]:
        """(tokens/s, MFU) since the last call; resets the window."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        tps, flops_per_sec = self._tokens / elapsed, self._flops / elapsed
        self._tokens, self._flops, self._t0 = 0.0, 0.0, time.perf_counter()
        return tps, flops_per_sec / self.peak_flops if self.peak_flops else 0.0
