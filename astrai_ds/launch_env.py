"""What a launcher tells a process through its environment, shared by training and tensor-parallel inference:
whether it was launched at all, how many ranks share its host, a world of one for plain `python`, and the
/dev/shm buffers of DeepSpeed's shared-memory all-reduce. Plain os and torch.distributed; no DeepSpeed."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                   "SLURM_NTASKS_PER_NODE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """True under a launcher (deepspeed, torchrun, srun: RANK is set; mpirun: its own variables)."""
    return "RANK" in os.environ or any(v in os.environ for v in MPI_VARS)


def world_size() -> int | None:
    """The number of ranks the launcher started (None when no launcher says)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def set_world_of_one() -> None:
    """The environment of a one-rank world on a free local port, for a process nobody launched."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def local_world_size() -> int | None:
    """Ranks on this host, from the first launcher variable that says (None when none does)."""
    for var in LOCAL_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def shm_buffer_path(rank: int) -> Path:
    """Where DeepSpeed's shared-memory all-reduce keeps `rank`'s buffer (its name: user id, MASTER_ADDR,
    MASTER_PORT and rank; see DeepSpeed's csrc/cpu/comm/shm.cpp)."""
    return (Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
            f"{os.environ['MASTER_PORT']}_{rank}")


def unlink_shm_buffers(rank: int, world_size: int) -> None:
    """Remove the names of DeepSpeed's shared-memory all-reduce buffers (about 70 MB per rank in /dev/shm).

    DeepSpeed creates one per rank when every rank is on this host and never unlinks it, so each run would
    leave them behind. Once every rank has mapped every buffer (DeepSpeed's set-up waits for that before
    init_distributed returns; the barrier makes sure all ranks got there), the names can go: the mappings
    stay valid until the processes exit, and the memory is freed then, however they exit."""
    if world_size < 2 or os.environ.get("LOCAL_SIZE") != str(world_size) or not (
            os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return
    torch.distributed.barrier()
    shm_buffer_path(rank).unlink(missing_ok=True)
