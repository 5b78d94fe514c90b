"""The layout of a run folder, shared by training (save, resume) and export (read):

    run/
      train_config.json model_config.json ds_config.json tokenizer.json   the resolved inputs (atomic writes)
      tokenizer_config.json generation_config.json                        a pretrained model's tokenizer only
      metrics.jsonl  tb/                                                  what the run logged
      global_stepN/                                                       one DeepSpeed checkpoint per save
        COMPLETE                                                          written last: JSON, see below
      latest                                                              the tag of the newest complete one
      train.lock                                                          held by the run training into it

A checkpoint is complete only once its COMPLETE marker exists: rank 0 writes it after every rank has saved
its shard. The marker records the step, the world size and ZeRO stage that wrote it, and the size of every
file in the folder, so a file damaged later (a truncated copy, a full disk) is found before DeepSpeed reads it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from pathlib import Path

from astrai_ds.errors import UserError

LATEST = "latest"
COMPLETE = "COMPLETE"
RUN_FILES = ("train_config.json", "model_config.json", "ds_config.json", "tokenizer.json")
LOCK_FILE = "train.lock"  # rank 0 of the run training into the folder holds an flock on it (training/guard.py)
_TAG = re.compile(r"^global_step(\d+)$")


class DamagedCheckpoint(UserError):
    """A checkpoint marked complete whose files no longer match its marker."""


def checkpoint_tag(step: int) -> str:
    return f"global_step{step}"


def tag_step(tag: str) -> int | None:
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def atomic_write(path: Path, content: str | bytes) -> None:
    """Write `content` so that a reader (another rank) or a kill never sees a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(content) if isinstance(content, bytes) else tmp.write_text(content)
    os.replace(tmp, path)


def write_marker(folder: Path, step: int, world_size: int, zero_stage: int, pipeline_stages: int = 1) -> None:
    """Mark `folder` complete, recording what wrote it and the size of each of its files."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    marker = {"step": step, "world_size": world_size, "zero_stage": zero_stage, "pipeline_stages": pipeline_stages,
              "files": files}
    atomic_write(folder / COMPLETE, json.dumps(marker, indent=1) + "\n")


def read_marker(folder: Path) -> dict | None:
    """The marker of a complete checkpoint, or None when the folder is not complete. A marker from before
    markers held JSON (a bare step number) reads as {"step": N}."""
    path = Path(folder) / COMPLETE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    try:
        marker = json.loads(text)
    except json.JSONDecodeError:
        raise DamagedCheckpoint(f"{path} is damaged (not JSON); use another checkpoint") from None
    return marker if isinstance(marker, dict) else {"step": int(marker)}


def verify(folder: Path) -> dict:
    """The marker of a complete checkpoint whose files are all there at their recorded sizes; raises
    DamagedCheckpoint naming the first file that is not."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        raise DamagedCheckpoint(f"{folder} is not a complete checkpoint (no {COMPLETE} marker)")
    for name, size in marker.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{path} is missing from a checkpoint marked complete")
        if path.stat().st_size != size:
            raise DamagedCheckpoint(f"{path} is damaged: {path.stat().st_size} bytes where {size} were saved")
    return marker


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints marked complete in `run_dir`, oldest first."""
    found = [(tag_step(p.name), p) for p in Path(run_dir).glob("global_step*") if tag_step(p.name) is not None]
    return sorted((step, p) for step, p in found if (p / COMPLETE).is_file())


def incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders without a marker: left by a run killed while saving."""
    return sorted(p for p in Path(run_dir).glob("global_step*")
                  if p.is_dir() and tag_step(p.name) is not None and not (p / COMPLETE).exists())


def latest_tag(run_dir: Path) -> str | None:
    path = Path(run_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def resolve_checkpoint(run_dir: Path, tag: str | None = None, fall_back: bool = False) -> tuple[str, list[str]]:
    """The checkpoint of `run_dir` to read -> (tag, notes).

    tag None means the one `latest` names. With `fall_back`, a damaged or incomplete latest checkpoint gives
    way to the newest older one that verifies, and `notes` says what was skipped and why; without, it is an
    error that names the damaged file and the complete checkpoints there are.
    """
    run_dir = Path(run_dir)
    wanted = tag or latest_tag(run_dir)
    if wanted is None:
        raise UserError(f"{run_dir} has no '{LATEST}' file: it holds no complete checkpoint yet; pass the run "
                        f"folder given as output_dir to train.py, or --tag global_stepN")
    candidates = [wanted] + ([p.name for _, p in reversed(list_checkpoints(run_dir)) if p.name != wanted]
                             if fall_back else [])
    notes = []
    for candidate in candidates:
        try:
            verify(run_dir / candidate)
            return candidate, notes
        except DamagedCheckpoint as e:
            if not fall_back:
                others = [p.name for _, p in list_checkpoints(run_dir) if p.name != candidate]
                raise DamagedCheckpoint(f"{e}; complete checkpoints in {run_dir}: {', '.join(others) or 'none'}") \
                    from None
            notes.append(f"skipping {candidate}: {e}")
    raise DamagedCheckpoint(f"no usable checkpoint in {run_dir} ({'; '.join(notes)}); set resume to \"none\" to "
                            f"start over in another output_dir")


def describe_holder(lock_path: Path) -> str:
    """What the lock file says about the run holding it, in words."""
    try:
        record = json.loads(Path(lock_path).read_text())
        return (f"pid {record['pid']} on {record['host']}, started {record['started']}: "
                f"{record['command']}")
    except (OSError, ValueError, KeyError, TypeError):  # written by a run that is just starting
        return f"see {lock_path}"


def output_dir_holder(output_dir: Path) -> str | None:
    """None when no training run holds `output_dir`'s lock; else the holder in words (pid, host, start time,
    command). For readers of a run folder, such as export, that must not read a run still being written."""
    path = Path(output_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return describe_holder(path) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
    finally:
        os.close(fd)
    return None
