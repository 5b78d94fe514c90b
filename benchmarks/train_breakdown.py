#!/usr/bin/env python
"""Where a training step's time goes: train.py instrumented, one rank's step split into its phases.

`benchmarks/train_throughput.py --breakdown` starts this script in place of train.py, through the same launcher,
with the same arguments and the same `build_trainer`, and reads back rank 0's steps. Per step it times

  data        the next batch (BatchIterator.next)
  forward     the model's forward (engine.forward)
  backward    engine.backward: autograd, DeepSpeed's gradient hooks, the gradient reduction at its end
  step        engine.step: norm, clipping, optimizer, parameter all-gather
  comm        the part of backward + step spent in torch.distributed collectives (and in the shared-memory
              all-reduce of astrai_ds.training.cpu, which skips torch.distributed), per collective too
  other       the rest of the step's wall time: loss function, lr and metric reads, logging and callbacks

and the plain loop of train_throughput.py records the same phases itself. Started on its own, with train.py's
arguments, it trains like train.py and rank 0 prints the table at the end:

    deepspeed --num_gpus 2 benchmarks/train_breakdown.py --config configs/train/pt_tiny.json --ds_config zero2.json

(from the repository root; the train config's data must exist, as for train.py). With ASTRAI_BENCH_WORKER set
to a file name, rank 0 writes its list of steps there as JSON instead.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
WORKER_ENV = "ASTRAI_BENCH_WORKER"  # set: this process is an instrumented trainer rank writing its steps there
PHASES = ("data", "forward", "backward", "step", "other")
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather", "reduce_scatter",
               "reduce", "broadcast", "barrier")


# --------------------------------------------------------------------------- instrumented trainer rank

class _Clock:
    """Seconds spent in wrapped callables, per key, since the last `take()`."""

    def __init__(self):
        self.acc: dict[str, float] = {}
        self._depth = 0

    def wrap(self, obj, name: str, key: str) -> None:
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.acc[key] = self.acc.get(key, 0.0) + time.perf_counter() - t0

        setattr(obj, name, timed)

    def take(self) -> dict:
        acc, self.acc = self.acc, {}
        return acc


def worker_main(out_path: str | None) -> int:
    """Train like train.py, timing each step's phases: data, the model's forward (engine.forward), the
    backward (engine.backward: autograd, DeepSpeed's gradient hooks, the gradient reduction at its end),
    the step (engine.step: norm, clipping, optimizer, parameter all-gather), the collectives inside them,
    and the rest (loss function, lr and metric reads, callbacks). Rank 0 writes the list of steps to
    `out_path`, or prints their medians when it is None."""
    import warnings

    import torch.distributed as dist

    from astrai_ds.errors import UserError
    from astrai_ds.extensions import use_extensions_cache
    from astrai_ds.training import cpu
    from astrai_ds.training.callbacks import Callback
    from astrai_ds.training.run import build_parser, build_trainer

    args = build_parser("benchmarks/train_breakdown.py").parse_args()
    use_extensions_cache()  # DeepSpeed's compiled ops where train.py keeps them
    warnings.filterwarnings("ignore", category=FutureWarning)
    clock = _Clock()
    # Before DeepSpeed starts: its comm backend keeps references to some of these functions.
    for name in COLLECTIVES:
        if hasattr(dist, name):
            clock.wrap(dist, name, f"comm.{name}")
    clock.wrap(cpu._ShmRouter, "_shm_all_reduce", "comm.shm_all_reduce")  # what skips torch.distributed

    class Recorder(Callback):
        def __init__(self):
            self.steps: list[dict] = []

        def on_train_begin(self, trainer) -> None:
            clock.take()
            self.t = time.perf_counter()

        def on_step_end(self, trainer, metrics: dict) -> None:
            now = time.perf_counter()
            acc = clock.take()
            wall = now - self.t
            self.t = now
            row = {k: acc.get(k, 0.0) for k in ("data", "forward", "backward", "step")}
            row["comm"] = sum(v for k, v in acc.items() if k.startswith("comm."))
            row["collectives"] = {k[5:]: v for k, v in acc.items() if k.startswith("comm.")}
            row["other"] = wall - sum(row[k] for k in ("data", "forward", "backward", "step"))
            row["wall"] = wall
            self.steps.append(row)

    try:
        trainer = build_trainer(args)
        clock.wrap(trainer.engine, "forward", "forward")
        clock.wrap(trainer.engine, "backward", "backward")
        clock.wrap(trainer.engine, "step", "step")
        clock.wrap(trainer.train_batches, "next", "data")
        recorder = Recorder()
        trainer.callbacks.insert(0, recorder)  # first: the step's wall time then covers the other callbacks
        trainer.fit()
        if trainer.dist.is_main:
            if out_path:
                Path(out_path).write_text(json.dumps(recorder.steps))
            elif recorder.steps:
                print()
                print_breakdown({"train.py": recorder.steps[1:] or recorder.steps})  # the first step warms up
        return 0
    except UserError as e:  # as train.py says it: one line, no traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ report

def phase_medians(steps: list[dict]) -> dict:
    row = {k: statistics.median(s[k] for s in steps) for k in ("wall", *PHASES, "comm")}
    names = sorted({name for s in steps for name in s.get("collectives", {})})
    row["collectives"] = {name: statistics.median(s.get("collectives", {}).get(name, 0.0) for s in steps)
                          for name in names}
    return row


def print_breakdown(breakdown: dict[str, list[dict]]) -> dict:
    """Median milliseconds per step of each phase, rank 0 (the phases are medians, so they need not add up)."""
    rows = {name: phase_medians(steps) for name, steps in breakdown.items()}
    print("where a step's time goes (rank 0, median ms per step; `comm` is the part of backward + step spent "
          "in torch.distributed collectives):")
    w = max(15, *(len(name) for name in rows))
    head = f"{'variant':<{w}} {'wall':>7} " + " ".join(f"{k:>9}" for k in (*PHASES, "comm"))
    print(head)
    print("-" * len(head))
    for name, m in rows.items():
        print(f"{name:<{w}} {m['wall'] * 1e3:>7.1f} " + " ".join(f"{m[k] * 1e3:>9.1f}" for k in (*PHASES, "comm")))
        if m["collectives"]:
            print(f"{'':<{w}}   comm: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in m["collectives"].items()))
    print("  forward: the model's forward only; other: loss function, lr and metric reads, logging and callbacks; "
          "plain step: clip_grad_norm_ + AdamW.step + zero_grad")
    return rows


if __name__ == "__main__":
    from astrai_ds.training.distributed import exit_process

    exit_process(worker_main(os.environ.get(WORKER_ENV) or None))  # a trainer rank ends like train.py's
