"""Training on DeepSpeed's CPU accelerator: faster collectives and an allocator that keeps its memory.

Collectives. On DeepSpeed's CPU accelerator, ZeRO's gradient all-reduce and parameter all-gather go through
gloo over loopback TCP. For CPU ranks of one host DeepSpeed also ships a shared-memory all-reduce (the
`deepspeed_shm_comm` op behind `deepspeed.comm.inference_all_reduce`, used by its CPU inference), about three
times faster on the same data (benchmarks/cpu_collectives.py). `install_shm_collectives()` routes these calls
of `deepspeed.comm` through it:

- `all_reduce(SUM)` of a contiguous bf16, fp16 or fp32 tensor: the shared-memory kernel, in place;
- `all_gather_into_tensor`: the other ranks' slots of the output zeroed, this rank's input copied into its
  slot, then the shared-memory all-reduce (adding zeros is exact: the result is the gathered tensor bit for
  bit; a -0.0 may come back as +0.0).

Only synchronous calls over the whole world qualify (a group of every rank included); anything else (other
dtypes and operations, sub-groups, `async_op=True`, ranks on several hosts, a CPU without the kernel's
vector instructions) goes to gloo exactly as before. Every rank makes the same choice for the same call, so
the shared-memory kernel and gloo never interleave differently on two ranks.

Allocator. glibc's malloc serves every block above 32 MB (and smaller ones, depending on its history) with a
fresh mmap and unmaps it on free, so the large temporaries of every step (logits, flat gradient copies,
fp32 casts of the gradients) are page-faulted and zeroed by the kernel again on every step.
`keep_freed_memory()` tells malloc to keep such blocks in its heap for reuse (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

_MIN_LEVEL = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 2}  # avx2 for fp32, avx512bw for 16-bit


def shm_available() -> bool:
    """Whether DeepSpeed's shared-memory all-reduce is set up for this world: a CPU world of more than one
    rank, all on this host (DeepSpeed initialises the kernel only when LOCAL_SIZE equals the world size)."""
    import deepspeed.comm as dist
    from deepspeed.comm import comm as ds_comm

    cdb = ds_comm.cdb
    if cdb is None or getattr(cdb, "shm_comm_op", None) is None:
        return False
    world = dist.get_world_size()
    return (world > 1 and os.environ.get("LOCAL_SIZE") == str(world)
            and getattr(cdb, "shm_vector_kernel_level", 0) >= 1
            and hasattr(torch.ops, "deepspeed") and hasattr(torch.ops.deepspeed, "inference_all_reduce_"))


class _ShmRouter:
    """Wraps the methods of DeepSpeed's communication backend (`deepspeed.comm.comm.cdb`)."""

    def __init__(self, cdb):
        self.cdb = cdb
        self.world = torch.distributed.get_world_size()
        self.level = cdb.shm_vector_kernel_level
        self.gloo_all_reduce = cdb.all_reduce
        self.gloo_all_gather_into_tensor = cdb.all_gather_into_tensor
        self.calls = 0  # collectives served by shared memory (for tests and benchmarks)

    def _eligible(self, tensor: torch.Tensor, group, async_op: bool) -> bool:
        return (not async_op and tensor.device.type == "cpu" and tensor.is_contiguous()
                and self.level >= _MIN_LEVEL.get(tensor.dtype, 99)
                and (group is None or torch.distributed.get_world_size(group) == self.world))

    def _shm_all_reduce(self, tensor: torch.Tensor) -> None:
        torch.ops.deepspeed.inference_all_reduce_(tensor)
        self.calls += 1

    def all_reduce(self, tensor, op=torch.distributed.ReduceOp.SUM, group=None, async_op=False):
        if self._eligible(tensor, group, async_op) and self.cdb._reduce_op(op) == torch.distributed.ReduceOp.SUM:
            self._shm_all_reduce(tensor)
            return None  # what torch.distributed.all_reduce returns for a synchronous call
        return self.gloo_all_reduce(tensor, op, group, async_op)

    def all_gather_into_tensor(self, output_tensor, input_tensor, group=None, async_op=False):
        n = input_tensor.numel()
        if (self._eligible(output_tensor, group, async_op) and input_tensor.dtype == output_tensor.dtype
                and input_tensor.is_contiguous() and output_tensor.numel() == n * self.world):
            rank = torch.distributed.get_rank(group)
            flat = output_tensor.view(-1)
            mine = flat.narrow(0, rank * n, n)
            if rank > 0:
                flat.narrow(0, 0, rank * n).zero_()
            if rank < self.world - 1:
                flat.narrow(0, (rank + 1) * n, (self.world - rank - 1) * n).zero_()
            if mine.data_ptr() != input_tensor.data_ptr():  # ZeRO-2 gathers in place: its input is that slot
                mine.copy_(input_tensor.view(-1))
            self._shm_all_reduce(flat)
            return None
        return self.gloo_all_gather_into_tensor(output_tensor, input_tensor, group, async_op)


_router: _ShmRouter | None = None


def install_shm_collectives() -> bool:
    """Route `deepspeed.comm`'s qualifying all-reduces and all-gathers through shared memory; True when done
    (idempotent), False when the shared-memory kernel is not available for this world."""
    global _router
    from deepspeed.comm import comm as ds_comm

    if _router is not None and ds_comm.cdb is _router.cdb:
        return True
    if not shm_available():
        return False
    _router = _ShmRouter(ds_comm.cdb)
    ds_comm.cdb.all_reduce = _router.all_reduce
    ds_comm.cdb.all_gather_into_tensor = _router.all_gather_into_tensor
    return True


def shm_supports(dtype: torch.dtype) -> bool:
    """Whether an all-reduce of `dtype` takes the shared-memory path on this CPU (after install)."""
    return _router is not None and _router.level >= _MIN_LEVEL.get(dtype, 99)


def shm_calls() -> int:
    """How many collectives the shared-memory kernel has served in this process."""
    return _router.calls if _router is not None else 0


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from its heap and never shrink the heap: freed memory is reused
    by the next step instead of being unmapped and faulted in again. True when set (glibc on Linux); the
    process's memory then stays at its peak until it exits."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
