"""What keeps a run from being lost or mixed up with another one: the output-folder lock and the watch on
the launcher.

- **One run per output folder.** Rank 0 holds an exclusive `flock` on `output_dir/train.lock` for the whole
  run and writes its pid, host, start time and command into the file. A second run into the same folder
  stops before it touches anything, with a message naming the first. The kernel drops the lock when its
  process ends, however it ends, so a killed run never leaves the folder locked.
- **No rank outlives its launcher.** A rank started by DeepSpeed's `launch.py` (itself started by the
  `deepspeed` command) or by `torchrun` watches those processes. When one of them is gone (killed, or
  ended by Ctrl-C), the ranks can still reach each other, so `StopOnSignal` stops them after the same step
  and the Checkpointer saves it. Only real launchers are watched: a rank under a shell (plain `python`,
  `nohup`), `srun` or `mpirun` keeps training whatever happens to the processes above it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from astrai_ds.errors import UserError
from astrai_ds.run_dir import LOCK_FILE, describe_holder

if TYPE_CHECKING:
    from astrai_ds.training.distributed import DistInfo

# Errors from flock on a file system that cannot lock (some NFS and Lustre mounts).
_NO_LOCKING = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class OutputDirInUse(UserError):
    """Another training run holds the output folder's lock."""


class RunLock:
    """An exclusive lock on a run folder, held from `acquire` until `release` or the end of the process."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def acquire(cls, output_dir: Path) -> RunLock:
        """Lock `output_dir` (created if missing) for this process, or raise OutputDirInUse naming the holder.
        On a file system without locks, returns an unheld lock after a warning."""
        output_dir = Path(output_dir)
        path = output_dir / LOCK_FILE
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"cannot write to output_dir {output_dir}: {e.strerror}; choose a folder you can "
                            f"write to (--set output_dir=...)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise OutputDirInUse(f"output_dir {output_dir} is in use by another training run "
                                     f"({describe_holder(path)}); wait for it to end, stop it (SIGTERM to that pid "
                                     f"saves a checkpoint and stops the run), or give this run another output_dir "
                                     f"(--set output_dir=...)") from None
            if e.errno in _NO_LOCKING:
                print(f"warning: cannot lock {path} ({e.strerror}): nothing stops a second run from writing into "
                      f"{output_dir} at the same time", file=sys.stderr, flush=True)
                return cls(path, None)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(_holder_record()) + "\n").encode())
        return cls(path, fd)

    def release(self) -> None:
        """Empty the file (nobody holds it now) and unlock. The file stays: removing it would let a process
        that opened it just before lock a file that no longer has a name, next to a new one."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor drops the lock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)}


def lock_output_dir(output_dir: Path, dist_info: DistInfo) -> RunLock:
    """Rank 0 locks `output_dir` for this run (`RunLock.acquire`); every rank learns whether it could, and when
    it could not, all of them raise OutputDirInUse (rank 0's message names the running run). Call it on every
    rank, after the process group exists and before anything reads or writes in `output_dir`."""
    lock, error = RunLock(Path(output_dir) / LOCK_FILE, None), None
    if dist_info.is_main:
        try:
            lock = RunLock.acquire(output_dir)
        except UserError as e:
            error = e
    import torch  # here: the launcher watch (`find_launchers`) needs no torch, and starts in a watched process
    import torch.distributed as dist

    from astrai_ds.training.distributed import all_reduce_host

    if dist.is_initialized() and dist_info.world_size > 1:
        failed = all_reduce_host(torch.tensor([int(error is not None)], dtype=torch.int64), op=dist.ReduceOp.MAX)
        if failed.item() and error is None:  # only rank 0's message is printed
            error = OutputDirInUse(f"rank 0 could not lock output_dir {output_dir}")
    if error is not None:
        raise error
    return lock


# Launchers, by how their command line names them: `python -m MODULE ...` or `python .../SCRIPT ...`.
_LAUNCHER_MODULES = {"deepspeed.launcher.launch": "DeepSpeed's launch.py",
                     "deepspeed.launcher.runner": "the deepspeed launcher",
                     "torch.distributed.run": "torchrun", "torch.distributed.launch": "torch.distributed.launch"}
_LAUNCHER_SCRIPTS = {"deepspeed": "the deepspeed launcher", "ds": "the deepspeed launcher", "torchrun": "torchrun"}
_LAUNCHER_FILES = {"deepspeed/launcher/launch.py": "DeepSpeed's launch.py",
                   "deepspeed/launcher/runner.py": "the deepspeed launcher", "torch/distributed/run.py": "torchrun"}


def launcher_name(argv: list[str]) -> str | None:
    """Which launcher a command line runs (in words), or None when it is not one of those we watch."""
    if not argv:
        return None
    args = argv[1:] if Path(argv[0]).name.startswith("python") else argv
    skip = False
    for i, arg in enumerate(args):
        if skip:  # the value of an interpreter option
            skip = False
            continue
        if args is not argv and arg.startswith("-"):  # the interpreter's options
            if arg == "-m":
                return _LAUNCHER_MODULES.get(args[i + 1]) if i + 1 < len(args) else None
            if arg == "-c":
                return None
            skip = arg in ("-W", "-X", "--check-hash-based-pycs")
            continue
        path = arg.replace("\\", "/")
        return _LAUNCHER_SCRIPTS.get(Path(arg).name) or next(
            (name for suffix, name in _LAUNCHER_FILES.items() if path.endswith(suffix)), None)
    return None


@dataclass(frozen=True)
class Launcher:
    pid: int
    name: str  # in words, for messages
    start_time: int  # in clock ticks after boot: tells the process from a later one given the same pid

    def running(self) -> bool:
        stat = _proc_stat(self.pid)
        return stat is not None and stat[0] not in "ZX" and stat[2] == self.start_time

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid})"


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process from /proc, or None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def find_launchers(pid: int | None = None) -> tuple[Launcher, ...]:
    """The launchers above process `pid` (default: this one), nearest first: DeepSpeed's launch.py and the
    `deepspeed` command above it, or torchrun. The walk up stops at the first process that is not a launcher,
    so a shell, `nohup`, srun's slurmstepd or mpirun is never watched. Call it early: once a launcher has died
    its ranks belong to another parent. Empty where /proc does not exist."""
    found = []
    stat = _proc_stat(os.getpid() if pid is None else pid)
    while stat is not None and stat[1] > 1:
        parent = stat[1]
        stat = _proc_stat(parent)
        name = launcher_name(_cmdline(parent))
        if stat is None or name is None:
            break
        found.append(Launcher(parent, name, stat[2]))
    return tuple(found)


class LauncherWatch:
    """A daemon thread that calls `on_gone(launcher)` once, from the thread, when the first of `launchers` has
    ended (a zombie counts as ended). Checks every `interval` seconds: two small reads from /proc."""

    def __init__(self, launchers: tuple[Launcher, ...], on_gone: Callable[[Launcher], None], interval: float = 1.0):
        self.launchers, self.on_gone, self.interval = tuple(launchers), on_gone, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def gone(self) -> Launcher | None:
        return next((launcher for launcher in self.launchers if not launcher.running()), None)

    def start(self) -> LauncherWatch:
        if self.launchers and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="launcher-watch", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            launcher = self.gone()
            if launcher is not None:
                self.on_gone(launcher)
                return


class _LossTolerantStream:
    """A text stream that drops what it cannot write instead of raising (BrokenPipeError from a pipe whose
    reader is gone, EIO from a terminal that was closed)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tolerate_lost_output() -> None:
    """From now on, printing to stdout or stderr never raises. A run stopping because its launcher or Ctrl-C
    ended the processes it printed through (`deepspeed ... | tee log`) must still save its checkpoint."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _LossTolerantStream):
            setattr(sys, name, _LossTolerantStream(stream))
