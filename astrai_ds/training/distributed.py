"""Process-group setup for every way a user starts train.py.

- `deepspeed` launcher and `torchrun`: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* are set; use them.
- `mpirun -n N python train.py`: no RANK; DeepSpeed's MPI discovery (mpi4py) fills them in.
- plain `python train.py`: nothing is set and there is no MPI: a world of one on a free local port.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch

from astrai_ds.errors import UserError
from astrai_ds.launch_env import free_port, launched, local_world_size, set_world_of_one, unlink_shm_buffers

@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """This process's rank before the process group exists (0 when not launched)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPUs) and pin threads."""
    import deepspeed

    if not launched():
        set_world_of_one()
    try:
        deepspeed.init_distributed(verbose=False)
    except torch.distributed.DistError as e:
        error = rendezvous_error(e)
        if error is None:
            raise
        raise error from None
    info = DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=local_world_size() or 1,
    )
    # Ranks sharing a CPU must split its cores: two ranks of two threads on two cores fight and run
    # slower than two ranks of one thread each. An explicit OMP_NUM_THREADS always wins.
    if "OMP_NUM_THREADS" not in os.environ and info.local_world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    unlink_shm_buffers(info.rank, info.world_size)
    return info


def rendezvous_error(error: Exception) -> UserError | None:
    """One line saying what to do for a rendezvous that failed because of its address or port (None for other
    errors): the port is taken (rank 0 could not listen on it: often another run on the default 29500), or
    the ranks did not all meet there before the timeout."""
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    text = str(error)
    pick = (f"start the run on a free port: `deepspeed --master_port N ...` (torchrun: --master_port N; srun, "
            f"mpirun: MASTER_PORT=N), e.g. N = {free_port()}, free now")
    if "EADDRINUSE" in text or "address already in use" in text.lower():
        return UserError(f"port {port} on {socket.gethostname()} (MASTER_PORT) is already in use, perhaps by "
                         f"another training run; {pick}")
    if "timed out" in text.lower():
        return UserError(f"the ranks did not all meet at {addr}:{port} (MASTER_ADDR:MASTER_PORT) before the timeout "
                         f"({text.splitlines()[0]}); check that every rank was given the same address and port, "
                         f"that {addr} reaches rank 0's host from every node (deepspeed --master_addr), and that "
                         f"no other run uses the port; {pick}")
    return None


def exit_process(code: int) -> NoReturn:
    """End a rank's process with `code` without finalizing the interpreter; call it after
    destroy_process_group, with every file closed. Even then a rank's gloo threads can be torn down during
    finalization and abort the process ("terminate called without an active exception", exit -6) after a
    successful run. MPI, when DeepSpeed's discovery started it under mpirun, is finalized first."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_host(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce a small host tensor (metrics, flags) in place and return it. NCCL only reduces device
    tensors, so there the values make a round trip through the current GPU; gloo reduces them where they are."""
    op = op if op is not None else torch.distributed.ReduceOp.SUM
    if torch.distributed.get_backend() == "nccl":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        torch.distributed.all_reduce(on_device, op=op)
        tensor.copy_(on_device.cpu())
    else:
        torch.distributed.all_reduce(tensor, op=op)
    return tensor


def on_accelerator() -> bool:
    """Whether DeepSpeed runs on a GPU (or another device with streams) rather than its CPU accelerator."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def bf16_supported() -> bool:
    """Whether this device runs bf16 matmuls natively (so precision "auto" picks bf16)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
