"""The machine a benchmark runs on, described the same way by every script in benchmarks/.

Numbers from different machines are not comparable (docs/benchmarks.md), and on a CPU the same model of
processor gives different numbers with and without AVX-512 and native bf16, so every benchmark prints this
description at its start and writes it into its JSON output under "machine":

    cpu, cores, cpu_flags      the CPU's model name, os.cpu_count(), and which of the flags that matter for
                               the matmul kernels it has (avx2, avx512f, avx512_bf16, amx_bf16)
    bf16_native                whether the device runs bf16 matmuls natively (what precision "auto" reads)
    memory_gib                 the machine's memory
    gpus                       the CUDA devices' names (empty on a machine without GPUs)
    torch_threads              the threads torch uses in this process
    python, torch, deepspeed   versions (and those of any other package a benchmark names)
    cpu_busy_at_start          the share of all cores busy for a second before the benchmark started

`ForeignLoad` measures the same share while a benchmark runs, less the benchmark's own processes. `arg_parser` is
the command line every script starts from.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from importlib import metadata
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first paragraph as the description, the rest (what it measures, the
    commands it was run with) after the options, as written."""
    first, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=first, epilog=rest or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpuinfo() -> tuple[str, list[str]]:
    """The CPU's model name and its flags among CPU_FLAGS, from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            have = set(value.split())
            flags = [f for f in CPU_FLAGS if f in have]
        if model and flags:
            break
    return model, flags


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe(packages: tuple[str, ...] = (), busy_seconds: float = 1.0) -> dict:
    """This machine, as a JSON-ready dict (the keys are in the module's docstring). `packages` adds the versions
    of more packages; `busy_seconds` is how long to watch the CPU load before the benchmark starts (0: not)."""
    import torch

    from astrai_ds.training.distributed import bf16_supported

    cpu, flags = _cpuinfo()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    info = {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": flags, "bf16_native": bf16_supported(),
            "memory_gib": _memory_gib(), "gpus": gpus, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "deepspeed": version("deepspeed")}
    info.update({p: version(p) for p in packages})
    info["cpu_busy_at_start"] = cpu_busy(busy_seconds) if busy_seconds > 0 else None
    return info


def summary(info: dict) -> str:
    """One line of `describe()`'s dict, for the top of a benchmark's printout."""
    parts = [info["cpu"], f"{info['cores']} cores"]
    if info.get("cpu_flags"):
        parts.append(" ".join(info["cpu_flags"]))
    parts.append("native bf16" if info.get("bf16_native") else "no native bf16")
    if info.get("memory_gib") is not None:
        parts.append(f"{info['memory_gib']:.1f} GiB")
    parts.append(", ".join(info["gpus"]) if info.get("gpus") else "no GPU")
    parts.append(f"python {info['python']}")
    parts.append(f"torch {info['torch']} ({info['torch_threads']} threads)")
    known = {"cpu", "cores", "cpu_flags", "bf16_native", "memory_gib", "gpus", "torch_threads", "python", "torch",
             "cpu_busy_at_start"}
    parts += [f"{k} {v}" for k, v in info.items() if k not in known]
    busy = info.get("cpu_busy_at_start")
    if busy is not None:
        parts.append(f"CPU busy before start: {busy:.0%}")
    return " | ".join(parts)


def announce(packages: tuple[str, ...] = ()) -> dict:
    """`describe()` the machine, print its line first, and warn when other work kept the CPU busy: how every
    benchmark starts. Returns the description, for the benchmark's JSON."""
    info = describe(packages)
    print(f"machine: {summary(info)}", flush=True)
    warn_if_busy(info)
    return info


def warn_if_busy(info: dict, limit: float = 0.1) -> None:
    busy = info.get("cpu_busy_at_start")
    if busy is not None and busy > limit:
        print(f"warning: the CPU was {busy:.0%} busy before the benchmark started; other work skews the numbers",
              flush=True)


# ------------------------------------------------------------------------------------ load while running

def _busy_cpu_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (from /proc/stat; steal counts as busy), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_cpu_seconds() -> float:
    t = os.times()  # this process and its finished children (a benchmark's runs)
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """Share of the machine's cores kept busy by anything but this script and its children while it runs:
    other people's jobs skew a benchmark on a shared machine, and this says by how much they could have."""

    def __init__(self):
        self.busy, self.own, self.t = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()

    def share(self) -> float | None:
        busy = _busy_cpu_seconds()
        if busy is None or self.busy is None:
            return None
        wall = max(time.perf_counter() - self.t, 1e-9)
        foreign = (busy - self.busy) - (_own_cpu_seconds() - self.own)
        return round(min(max(foreign / (wall * (os.cpu_count() or 1)), 0.0), 1.0), 3)


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of all cores busy over `seconds`, before anything of ours runs."""
    load = ForeignLoad()
    time.sleep(seconds)
    return load.share()


if __name__ == "__main__":
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    info = describe()
    print(summary(info))
    print(json.dumps(info, indent=2))
