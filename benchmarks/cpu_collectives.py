#!/usr/bin/env python
"""ZeRO's collectives on CPU ranks of one host: gloo over loopback against DeepSpeed's shared-memory all-reduce.

Run it through the deepspeed launcher (2 CPU ranks, one thread each, as train.py runs them):

    deepspeed --num_gpus 2 benchmarks/cpu_collectives.py [--numel 21000000] [--reps 9]

For bf16 and fp32 tensors of --numel elements (the default is about the `small` model's parameter count: one
ZeRO-2 gradient all-reduce or parameter all-gather per step), rank 0 prints the median milliseconds of

  all_reduce              gloo (torch.distributed)     vs  deepspeed.comm with astrai_ds.training.cpu installed
  all_gather_into_tensor  gloo (torch.distributed)     vs  deepspeed.comm with astrai_ds.training.cpu installed

and checks that both give the same result bit for bit. Every timed call starts after a barrier.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import describe, summary  # noqa: E402  (benchmarks/machine.py)


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        tdist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=21_000_000, help="elements per tensor")
    p.add_argument("--reps", type=int, default=9, help="timed calls per measurement (median)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args()

    import deepspeed.comm as dist

    from astrai_ds.training import cpu
    from astrai_ds.training.distributed import exit_process, init_distributed

    info = init_distributed()
    if not cpu.install_shm_collectives():
        raise SystemExit("DeepSpeed's shared-memory all-reduce is not available: start this with the deepspeed "
                         "launcher on one host, with more than one rank")
    rank, world, n = info.rank, info.world_size, args.numel
    if rank == 0:
        print(f"machine: {summary(describe(busy_seconds=0))}")  # the other rank is busy starting up: no load check
        print(f"{world} ranks x {torch.get_num_threads()} thread(s), {n:,} elements, median of {args.reps} calls")
        print(f"{'collective':<24} {'dtype':<9} {'gloo ms':>8} {'shm ms':>8} {'speed-up':>8}")
    g = torch.Generator().manual_seed(rank)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(n, generator=g).to(dtype)
        a, b = x.clone(), x.clone()
        tdist.all_reduce(a)
        dist.all_reduce(b)
        assert torch.equal(a, b), "all_reduce: shared memory and gloo disagree"
        gloo = timed(lambda: tdist.all_reduce(a), args.reps)
        shm = timed(lambda: dist.all_reduce(b), args.reps)
        if rank == 0:
            print(f"{'all_reduce':<24} {str(dtype)[6:]:<9} {gloo:>8.1f} {shm:>8.1f} {gloo / shm:>7.1f}x")

        part = x.narrow(0, 0, n // world).clone()
        a, b = torch.empty(n // world * world, dtype=dtype), torch.empty(n // world * world, dtype=dtype)
        tdist.all_gather_into_tensor(a, part)
        dist.all_gather_into_tensor(b, part)
        assert torch.equal(a, b), "all_gather_into_tensor: shared memory and gloo disagree"
        gloo = timed(lambda: tdist.all_gather_into_tensor(a, part), args.reps)
        shm = timed(lambda: dist.all_gather_into_tensor(b, part), args.reps)
        if rank == 0:
            print(f"{'all_gather_into_tensor':<24} {str(dtype)[6:]:<9} {gloo:>8.1f} {shm:>8.1f} {gloo / shm:>7.1f}x")
    tdist.barrier()
    tdist.destroy_process_group()
    exit_process(0)


if __name__ == "__main__":
    main()
