"""Progress of a long inference loop on stderr (stdout carries the results): a tqdm bar on a terminal, else,
in a log or a pipe, a plain line at each tenth of the items, like training's Progress."""

from __future__ import annotations

import sys
import time


class Progress:
    """`total` items named `unit`; `enabled` False shows nothing."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True):
        self.total, self.desc, self.unit, self.done, self.tenths = total, desc, unit, 0, 0
        self.enabled, self.t0 = enabled and total > 0, time.perf_counter()
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.done * 10 // self.total > self.tenths:
            self.tenths = self.done * 10 // self.total
            print(f"{self.desc}: {self.done}/{self.total} {self.unit}s, {time.perf_counter() - self.t0:.0f}s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
