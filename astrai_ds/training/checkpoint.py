"""DeepSpeed checkpoints that survive a kill at any moment.

Every rank writes its own shard into `global_stepN/`; only when all ranks are done (a barrier) does
rank 0 mark the folder complete and move `latest` to it with an atomic rename. A run killed while
writing leaves `latest` on the previous, complete checkpoint, and resume never sees the half-written one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from astrai_ds.errors import UserError

LATEST = "latest"
COMPLETE = "COMPLETE"  # marker written into a checkpoint folder once every rank has saved its shard
_TAG = re.compile(r"^global_step(\d+)$")


def checkpoint_tag(step: int) -> str:
    return f"global_step{step}"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, output_dir: str | Path, step: int, client_state: dict, keep: int) -> Path:
    """Save a complete checkpoint of every rank, then point `latest` at it and prune old ones."""
    output_dir = Path(output_dir)
    tag = checkpoint_tag(step)
    # Each rank's RNG differs (dropout, sampling); keep them all so every rank resumes its own stream.
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    engine.save_checkpoint(str(output_dir), tag=tag, client_state={**client_state, "rng": rngs},
                           save_latest=False)
    dist.barrier()  # every rank's shard is on disk before anything points at it
    if dist.get_rank() == 0:
        (output_dir / tag / COMPLETE).write_text(f"{step}\n")
        atomic_write(output_dir / LATEST, tag)
        if keep > 0:
            prune_checkpoints(output_dir, keep)
    dist.barrier()
    return output_dir / tag


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = []
    for path in Path(output_dir).glob("global_step*"):
        m = _TAG.match(path.name)
        if m and (path / COMPLETE).exists():
            found.append((int(m.group(1)), path))
    return sorted(found)


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    latest = (output_dir / LATEST).read_text().strip()
    for _, path in list_checkpoints(output_dir)[:-keep]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(resume: str, output_dir: str | Path) -> tuple[Path, str] | None:
    """Where to resume from: (load_dir, tag), or None to start fresh.

    resume "auto": the checkpoint `latest` in output_dir names, if any; "none": start fresh; otherwise a
    checkpoint folder (`run/global_step200`) or a run folder holding `latest`.
    """
    if resume == "none":
        return None
    if resume == "auto":
        latest = Path(output_dir) / LATEST
        if not latest.exists():
            return None
        tag = latest.read_text().strip()
        if not (Path(output_dir) / tag / COMPLETE).exists():
            raise UserError(f"{latest} names {tag}, which is missing or incomplete; point resume at a complete "
                            f"checkpoint folder, or set resume to \"none\" to start over")
        return Path(output_dir), tag
    path = Path(resume)
    if (path / LATEST).exists():
        return find_checkpoint("auto", path)
    if (path / COMPLETE).exists():
        return path.parent, path.name
    raise UserError(f"resume: {resume} is not a complete checkpoint folder (global_stepN with a {COMPLETE} "
                    f"marker) nor a run folder with a '{LATEST}' file; use \"auto\", \"none\" or such a path")
