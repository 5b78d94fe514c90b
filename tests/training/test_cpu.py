"""Training on DeepSpeed's CPU accelerator: ZeRO's collectives through DeepSpeed's shared-memory all-reduce
(the same results as gloo, and the same training run), and the allocator setting."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT, free_port, launch, run_ranks, tiny_train_config, train_losses

# Where glibc put a 64 MiB tensor (bytes in mmapped blocks) and how large its heap stays once the tensor is
# freed, from mallinfo2(), with and without `keep_freed_memory()`.
_PLACEMENT = """
import ctypes, sys, torch
from astrai_ds.training.cpu import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(64 << 20, dtype=torch.uint8)
mapped = libc.mallinfo2().hblkhd
del x
print(mapped, libc.mallinfo2().arena)
"""


def test_keep_freed_memory_keeps_large_blocks_in_the_heap():
    """By default glibc maps a 64 MiB block on its own and unmaps it on free (so the next step faults it in
    again); with keep_freed_memory() it comes from the heap, and the heap keeps it after the free."""
    procs = {mode: subprocess.Popen([sys.executable, "-c", _PLACEMENT, mode], stdout=subprocess.PIPE, text=True)
             for mode in ("keep", "default")}  # a fresh process each (malloc's settings), both at once
    out = {mode: [int(v) for v in proc.communicate(timeout=120)[0].split()] for mode, proc in procs.items()}
    assert all(proc.returncode == 0 for proc in procs.values()), out
    block = 64 << 20
    assert out["default"][0] >= block, out  # mmapped on its own
    assert out["keep"][0] < block and out["keep"][1] >= block, out  # from the heap, still held after free


@pytest.mark.multiproc
def test_shm_collectives_match_gloo_bit_for_bit():
    proc = run_ranks(str(ROOT / "tests" / "training" / "shm_collectives_check.py"), [], 2, free_port())
    out = proc.stdout + proc.stderr
    for rank in (0, 1):
        # 9 calls per dtype (3 sizes x all_reduce and two all-gathers); bf16 only where the CPU has avx512bw
        assert re.search(rf"OK rank {rank} shm calls (18 \(bf16 on shared memory: True|9 \(bf16 on shared memory: "
                         rf"False)\)", out), out[-3000:]


@pytest.mark.multiproc
def test_shared_memory_and_gloo_train_identically(workspace, tmp_path):
    """ZeRO-2 in bf16 on 2 ranks: the losses with the shared-memory collectives equal gloo's exactly, and no
    shared-memory buffer outlives the run."""
    runs = {}
    for mode in ("auto", "gloo"):
        cfg = tiny_train_config(workspace, tmp_path / mode, precision="bf16", cpu__collectives=mode)
        proc = launch(cfg)
        assert proc.shm_left == [], proc.shm_left
        out = proc.stdout + proc.stderr
        assert ("collectives: shared memory" in out) == (mode == "auto"), out[-3000:]
        assert "malloc keeps freed memory" in out, out[-3000:]
        runs[mode] = train_losses(tmp_path / mode / "run")
    assert sorted(runs["auto"]) == list(range(1, 7))
    assert runs["auto"] == runs["gloo"]


def test_the_peak_measurement_shrinks_its_matmul_to_fit_its_time_budget(monkeypatch):
    """Start-up measures the matmul peak for MFU. A product too slow for the budget (bf16 where the CPU has no native
    bf16: seconds for one 1024^3 product) shrinks the matrices instead of holding up the run; a fast one keeps the
    size asked for."""
    import math

    import torch

    from astrai_ds.training.metrics import measure_peak_flops

    sizes, randn = [], torch.randn

    def recording(*shape, **kw):
        sizes.append(shape[0])
        return randn(*shape, **kw)

    monkeypatch.setattr(torch, "randn", recording)
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, size=512, iters=2, budget_s=1e6)
    assert sizes == [512, 512] and math.isfinite(peak) and peak > 0
    sizes.clear()
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, size=512, iters=2, budget_s=1e-9)
    assert sizes[:2] == [512, 512] and sizes[-1] == 128 and sizes == sorted(sizes, reverse=True)
    assert math.isfinite(peak) and peak > 0
