"""Where DeepSpeed keeps the ops it compiles on first use (its CPU communication op, CPU Adam, async_io for NVMe
offload): one folder per machine and Python environment under ~/.cache/astrai_ds, outside any checkout, so that
another run, the quickstart, the tests and a re-created `.venv` at the same place load them instead of compiling
them again (async_io takes about 7 minutes on 2 cores). The folder's name holds what a compiled op depends on: the
Python, torch and DeepSpeed versions, the CPU (DeepSpeed compiles its CPU ops for the host's instruction set, so a
home folder shared by machines with other CPUs gets one folder each) and where DeepSpeed is installed: torch's
just-in-time build compiles again whenever the compile command changes, and DeepSpeed's include paths, inside its
installation, are part of it. scripts/env.sh therefore installs DeepSpeed once per machine, in a shared environment
under every clone's `.venv`: all clones load the same ops. (Self-contained `.venv`s build once each; sharing one
folder between them would rebuild at every switch.) No torch or DeepSpeed import."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

ENV_VAR = "TORCH_EXTENSIONS_DIR"  # read by torch.utils.cpp_extension whenever DeepSpeed builds or loads an op


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def cpu_key() -> str:
    """The machine and a short hash of the CPU's model and instruction-set flags (Linux's /proc/cpuinfo)."""
    text = ""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
        text = "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in ("model name", "flags",
                                                                                          "Features")}))
    except OSError:
        text = platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def install_key() -> str:
    """A short hash of the folder DeepSpeed is installed in (found without importing it)."""
    spec = find_spec("deepspeed")
    where = str(Path(spec.origin).resolve().parent) if spec is not None and spec.origin else "none"
    return hashlib.sha256(where.encode()).hexdigest()[:8]


def extensions_dir() -> Path:
    """The compiled-ops folder for this machine, versions and environment: $XDG_CACHE_HOME (or ~/.cache)/astrai_ds/
    torch_extensions/py3.11-torch2.13.0-deepspeed0.19.8-x86_64-1a2b3c4d-env5e6f7a8b."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = (f"py{sys.version_info.major}.{sys.version_info.minor}-torch{_version('torch')}-"
           f"deepspeed{_version('deepspeed')}-{cpu_key()}-env{install_key()}")
    return cache / "astrai_ds" / "torch_extensions" / key


COMPILE_ENV_VAR = "TORCHINDUCTOR_CACHE_DIR"  # where torch.compile's inductor keeps the kernels it generated


def use_compile_cache() -> Path:
    """Point TORCHINDUCTOR_CACHE_DIR at a folder beside the compiled ops (same key: machine, versions, environment)
    unless it is set already, and return it: a train config with `compile` pays the compilation once per machine,
    not once per run or resume. Call it before anything compiles: inductor fixes the variable on first use."""
    if not os.environ.get(COMPILE_ENV_VAR):
        os.environ[COMPILE_ENV_VAR] = str(extensions_dir().parent.parent / "inductor" / extensions_dir().name)
    return Path(os.environ[COMPILE_ENV_VAR])


def missing_cpp_compiler() -> str | None:
    """None where inductor finds the C++ compiler its CPU kernels need; else why not, in a few words (imports torch)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as e:  # noqa: BLE001 (whatever inductor's search raises)
        return type(e).__name__
    return None


def no_cpp_compiler(eager: str, turn_off: str) -> str | None:
    """None where inductor finds a C++ compiler; else the one line every `compile` option prints before going on
    eager: what runs eager instead (`eager`) and how to stop asking (`turn_off`)."""
    why = missing_cpp_compiler()
    return None if why is None else (f"compile: no C++ compiler for torch.compile on this CPU ({why}); {eager}. "
                                     f"Install one (apt-get install g++, or set CXX) or {turn_off}")


def use_extensions_cache() -> Path:
    """Point TORCH_EXTENSIONS_DIR at `extensions_dir()` unless it is set already (a user's own choice wins), and
    return the folder in use. Called first thing by train.py and astrai-ds; every rank computes the same name."""
    if not os.environ.get(ENV_VAR):
        os.environ[ENV_VAR] = str(extensions_dir())
    return Path(os.environ[ENV_VAR])


if __name__ == "__main__":  # scripts/env.sh: print the folder
    print(extensions_dir())
