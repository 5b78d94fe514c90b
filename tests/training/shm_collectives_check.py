"""Started by the tests on 2 CPU ranks: the collectives that `astrai_ds.training.cpu` routes through DeepSpeed's
shared-memory all-reduce give gloo's results bit for bit, and the calls it must leave alone still reach gloo. Each
rank prints one `OK` line."""

import argparse

import torch
import torch.distributed as tdist

import deepspeed.comm as dist
from astrai_ds.launch_env import shm_buffer_path
from astrai_ds.training import cpu
from astrai_ds.training.distributed import exit_process, init_distributed

p = argparse.ArgumentParser()
p.add_argument("--local_rank", type=int, default=-1)
p.parse_args()

info = init_distributed()
rank, world = info.rank, info.world_size
shm_name = shm_buffer_path(rank)
assert not shm_name.exists(), f"{shm_name} left in /dev/shm after start-up"
assert cpu.install_shm_collectives(), "shared-memory all-reduce not available on 2 local CPU ranks"
assert cpu.install_shm_collectives()  # idempotent

g = torch.Generator().manual_seed(100 + rank)
expected_calls = 0
for dtype in (torch.float32, torch.bfloat16):
    # The kernel needs avx2 for fp32 and avx512bw for 16-bit types; without them the call stays on gloo.
    shm = cpu.shm_supports(dtype)
    # sizes below and above the kernel's 1 MiB naive/distributed threshold and its 32 MiB chunk
    for numel in (5, 300_000, 9_000_001):
        x = torch.randn(numel, generator=g).to(dtype)
        want = x.clone()
        tdist.all_reduce(want)  # gloo directly
        got = x.clone()
        before = cpu.shm_calls()
        dist.all_reduce(got)
        assert cpu.shm_calls() == before + shm, f"all_reduce of {dtype} took the wrong path (shared memory: {shm})"
        assert torch.equal(got, want), (dtype, numel, (got.float() - want.float()).abs().max())

        part = torch.randn(numel, generator=g).to(dtype)
        want = torch.empty(numel * world, dtype=dtype)
        tdist.all_gather_into_tensor(want, part)
        got = torch.full((numel * world,), float("nan"), dtype=dtype)  # stale contents must not leak through
        dist.all_gather_into_tensor(got, part)
        assert torch.equal(got, want), (dtype, numel, "all_gather_into_tensor")
        # ZeRO-2's in-place form: the input is this rank's slot of the output
        flat = torch.full((numel * world,), float("nan"), dtype=dtype)
        flat.narrow(0, rank * numel, numel).copy_(part)
        dist.all_gather_into_tensor(flat, flat.narrow(0, rank * numel, numel))
        assert torch.equal(flat, want), (dtype, numel, "in-place all_gather_into_tensor")
        expected_calls += 3 * shm

# calls that must stay on gloo: another dtype, another operation, an asynchronous call
before = cpu.shm_calls()
ints = torch.tensor([rank + 1, 10 * (rank + 1)], dtype=torch.int64)
dist.all_reduce(ints)
assert ints.tolist() == [3, 30], ints
m = torch.tensor([float(rank)])
dist.all_reduce(m, op=dist.ReduceOp.MAX)
assert m.item() == world - 1, m
a = torch.ones(1000)
dist.all_reduce(a, async_op=True).wait()
assert torch.equal(a, torch.full((1000,), float(world))), a
assert cpu.shm_calls() == before, "a call that needs gloo went through shared memory"

tdist.barrier()
assert cpu.shm_calls() == expected_calls, (cpu.shm_calls(), expected_calls)
print(f"OK rank {rank} shm calls {cpu.shm_calls()} (bf16 on shared memory: {cpu.shm_supports(torch.bfloat16)})",
      flush=True)
tdist.destroy_process_group()
exit_process(0)
