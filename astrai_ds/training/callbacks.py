"""Side concerns of training as callbacks around the loop: evaluation, early stop, logging, TensorBoard,
checkpoints and the progress bar. Every rank runs every callback (collectives must match); only rank 0
writes files or prints.

A callback that must resume (its state changes from step to step) says `stateful = True` and has
`state_dict(trainer)` / `load_state_dict(sd, trainer)`; its state travels in the checkpoint under its
`name`. The others hold nothing that a resumed run could miss.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from astrai_ds.run_dir import atomic_write
from astrai_ds.training.checkpoint import save_checkpoint
from astrai_ds.training.distributed import all_reduce_host
from astrai_ds.training.guard import Launcher, LauncherWatch, tolerate_lost_output
from astrai_ds.training.metrics import Throughput

# The order callbacks run in at every step, enforced by `Trainer.add_callbacks`: the evaluation sets the eval
# loss that early stop reads; early stop and a signal set `should_stop`; the logger's line is what the progress
# bar shows; the checkpoint comes last, so it saves every other callback's state after this step.
CALLBACK_ORDER = ("Evaluator", "EarlyStop", "FrozenReferenceCheck", "Logger", "Progress", "StopOnSignal",
                  "Checkpointer")


class Callback:
    stateful = False  # True: state_dict() / load_state_dict() carry its state across a resume

    @property
    def name(self) -> str:
        """The key of its state in a checkpoint and of its place in CALLBACK_ORDER."""
        return type(self).__name__

    def on_train_begin(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, metrics: dict) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass


class MetricsWriter:
    """Rank 0's sink for scalars: one JSON line per record in metrics.jsonl, and TensorBoard under tb/.

    A run resumed from the checkpoint of step `resume_step` first drops what the interrupted run logged after
    that step (it is about to be logged again): metrics.jsonl is cut back to the lines of steps up to it, and
    TensorBoard's writer purges the later events.
    """

    def __init__(self, output_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = Path(output_dir) / "metrics.jsonl"
            if resume_step is not None and path.exists():
                kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                        if _logged_step(line) <= resume_step]
                atomic_write(path, "".join(kept))
            self._jsonl = open(path, "a", encoding="utf-8")
            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tb"),
                                     purge_step=resume_step + 1 if resume_step is not None else None)

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a line cut short by a kill counts as after every step (dropped)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _sum_over_ranks(values: list) -> list[float]:
    """Floats or 0-d tensors (read on the host here) summed over all ranks."""
    return all_reduce_host(torch.tensor([float(v) for v in values], dtype=torch.float64)).tolist()


class Logger(Callback):
    """Every log_interval steps: the strategy's metrics (loss first; each step's global value, averaged over
    the steps since the last line), lr, grad norm, trained tokens/s (all ranks, and per rank), MFU.

    The strategy's metrics are each rank's shares of the global batch's values, so the sum over ranks is the
    global value. They are summed as tensors on the model's device and read on the host only when a line is written
    (or a checkpoint taken). The sums since the last line are part of the checkpoint (summed over the ranks when saved,
    held by rank 0 when loaded), so a resumed run logs the same numbers as an uninterrupted one."""

    stateful = True

    def __init__(self, writer: MetricsWriter, interval: int, throughput: Throughput):
        self.writer, self.interval, self.throughput = writer, interval, throughput
        self._sums: dict[str, float] = {}
        self._steps = 0
        self.last: dict = {}

    def on_train_begin(self, trainer) -> None:
        self.throughput.rate()  # start the clock after set-up, not at construction

    def on_step_end(self, trainer, metrics: dict) -> None:
        for key, value in metrics["metrics"].items():  # in float64, as Python floats would add them
            value = value.detach().double() if isinstance(value, torch.Tensor) else value
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._steps += 1
        self.throughput.add(metrics["tokens"], metrics["flops"])
        step = trainer.state.step
        if step % self.interval and step != trainer.cfg.max_steps:
            return
        keys = sorted(self._sums)  # the same order on every rank
        means = {k: v / self._steps for k, v in zip(keys, _sum_over_ranks([self._sums[k] for k in keys]))}
        self._sums, self._steps = {}, 0
        tps, mfu = self.throughput.rate()
        self.last = {"train/loss": means.pop("loss"), "train/lr": metrics["lr"],
                     "train/grad_norm": float("nan") if metrics["grad_norm"] is None else float(metrics["grad_norm"]),
                     "train/tokens_per_sec": tps,
                     "train/tokens_per_sec_per_rank": tps / trainer.dist.world_size, "train/mfu": mfu,
                     "train/tokens_seen": trainer.state.tokens_seen, "train/epoch": trainer.train_batches.sampler.epoch}
        self.last.update({k if "/" in k else f"train/{k}": v for k, v in means.items()})
        self.writer.write(step, self.last)
        loss = self.last["train/loss"]
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: training loss is {loss}; lower optimizer.lr or check the data")

    def on_train_end(self, trainer) -> None:
        self.writer.close()

    def state_dict(self, trainer) -> dict:
        keys = sorted(self._sums)
        return {"sums": dict(zip(keys, _sum_over_ranks([self._sums[k] for k in keys]))), "steps": self._steps}

    def load_state_dict(self, sd: dict, trainer) -> None:
        self._steps = sd["steps"]
        self._sums = {k: v if trainer.dist.is_main else 0.0 for k, v in sd["sums"].items()}


class Evaluator(Callback):
    """Every eval_interval steps and at the end of training: the eval loss, shared by all ranks. A run stopped
    before max_steps (a signal, a lost launcher) is not at its end: it adds no evaluation, so its resumed
    continuation logs exactly what an uninterrupted run logs (early stop stops right after an evaluation)."""

    stateful = True

    def __init__(self, writer: MetricsWriter, interval: int):
        self.writer, self.interval = writer, interval
        self.last_step = -1  # the step of the latest evaluation

    def _run(self, trainer) -> None:
        loss = trainer.evaluate()
        self.last_step = trainer.state.step
        trainer.state.eval_loss, trainer.state.eval_step = loss, trainer.state.step
        trainer.log(f"step {trainer.state.step}: eval loss {loss:.4f}")
        self.writer.write(trainer.state.step, {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50))})

    def on_train_begin(self, trainer) -> None:
        if trainer.state.step == 0:
            self._run(trainer)  # the starting point, so the curve shows how far training moved it

    def on_step_end(self, trainer, metrics: dict) -> None:
        if trainer.state.step % self.interval == 0:
            self._run(trainer)

    def on_train_end(self, trainer) -> None:
        if self.last_step != trainer.state.step and trainer.state.step >= trainer.cfg.max_steps:
            self._run(trainer)

    def state_dict(self, trainer) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, sd: dict, trainer) -> None:
        self.last_step = sd["last_step"]


class EarlyStop(Callback):
    """Stop when eval loss has not improved by min_delta for `patience` evaluations."""

    stateful = True

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.bad, self.seen_step = float("inf"), 0, -1  # seen_step: the evaluation last counted

    def on_step_end(self, trainer, metrics: dict) -> None:
        state = trainer.state
        if state.eval_loss is None or state.eval_step == self.seen_step:
            return
        self.seen_step = state.eval_step
        if state.eval_loss < self.best - self.min_delta:
            self.best, self.bad = state.eval_loss, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                state.should_stop = True
                trainer.log(f"early stop at step {state.step}: eval loss {state.eval_loss:.4f} has not improved "
                            f"on {self.best:.4f} for {self.bad} evaluations")

    def state_dict(self, trainer) -> dict:
        return {"best": self.best, "bad": self.bad, "seen_step": self.seen_step}

    def load_state_dict(self, sd: dict, trainer) -> None:
        self.best, self.bad = sd["best"], sd["bad"]
        self.seen_step = sd.get("seen_step", trainer.state.eval_step)


class Checkpointer(Callback):
    """Every save_interval steps and at the end of training."""

    def __init__(self, output_dir: Path, interval: int, keep: int):
        self.output_dir, self.interval, self.keep = output_dir, interval, keep
        self.last_saved = -1

    def _save(self, trainer) -> None:
        path = save_checkpoint(trainer.engine, self.output_dir, trainer.state.step, trainer.state_dict(), self.keep,
                               trained_only=trainer.cfg.lora.enabled)
        self.last_saved = trainer.state.step
        trainer.log(f"saved checkpoint {path}")

    def on_step_end(self, trainer, metrics: dict) -> None:
        if trainer.state.step % self.interval == 0:
            self._save(trainer)

    def on_train_end(self, trainer) -> None:
        if self.last_saved != trainer.state.step and trainer.state.step > trainer.start_step:
            self._save(trainer)


class StopOnSignal(Callback):
    """Stop after the current step, with a checkpoint, when a signal asks for it or the launcher is gone.

    - SIGUSR1 asks for a checkpoint now (Slurm sends it before a job's time limit with `--signal`; so can
      `kill -USR1`). The run exits 0, ready to resume.
    - SIGTERM (`kill`, `scancel`; DeepSpeed's launch.py and torchrun pass theirs and Ctrl-C on as SIGTERM) and
      SIGINT (Ctrl-C) do the same, and the run exits 128 + the signal's number (143, 130) as a killed process
      would. A second Ctrl-C stops at once (KeyboardInterrupt). Launchers kill their ranks 30 s after passing
      SIGTERM on: a step and a checkpoint that take longer are cut short, and `latest` stays on the last
      complete checkpoint.
    - One of `launchers` (training/guard.py: DeepSpeed's launch.py, the `deepspeed` command, torchrun) ended:
      nothing would stop the ranks any more, and a `deepspeed ... && next step` chain may already have gone
      on. The run exits 1.

    Ranks learn of these at different moments, so once before the first step and after every step they agree
    through a small all-reduce and all stop after the same step. Run the same command again to resume."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, launchers: tuple[Launcher, ...] = ()):
        self.received: frozenset[int] = frozenset()  # signal numbers; replaced, never changed in place
        self.lost: Launcher | None = None  # the launcher this rank saw end
        self.exit_code = 0  # what the process should exit with once training has ended
        self._watch = LauncherWatch(launchers, self._launcher_gone)
        self._previous: dict = {}
        self._agreed = False

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and signum in self.received:  # Ctrl-C twice: do not wait for the step
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = self.received | {int(signum)}  # a handler may run while the main thread reads the set
        tolerate_lost_output()

    def _launcher_gone(self, launcher: Launcher) -> None:
        tolerate_lost_output()
        self.lost = launcher

    def on_train_begin(self, trainer) -> None:
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set them
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        gone = self._watch.gone()  # it may have ended while the run was being set up
        if gone is not None:
            self._launcher_gone(gone)
        self._watch.start()
        self._agree(trainer)

    def on_step_end(self, trainer, metrics: dict) -> None:
        self._agree(trainer)

    def _agree(self, trainer) -> None:
        mine = [max(self.received, default=0), int(self.lost is not None)]
        sig, lost = all_reduce_host(torch.tensor(mine, dtype=torch.int64), op=dist.ReduceOp.MAX).tolist()
        if not (sig or lost) or self._agreed:
            return
        self._agreed = trainer.state.should_stop = True
        if sig in (signal.SIGTERM, signal.SIGINT):
            self.exit_code = 128 + sig
        elif lost:
            self.exit_code = 1
        if sig:
            reason = f"{signal.Signals(sig).name} received"
        else:
            reason = f"{self.lost if self.lost else 'the launcher of another rank'} is gone"
        step = trainer.state.step
        trainer.log(f"{reason}: stopping after step {step} with a checkpoint; run the same command again to resume"
                    if step > trainer.start_step else f"{reason}: stopping before training, at step {step}")

    def on_train_end(self, trainer) -> None:
        self._watch.stop()
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


class Progress(Callback):
    """A tqdm bar on a terminal; plain log lines when output goes to a file (Slurm, CI, nohup)."""

    def __init__(self, enabled: bool, logger: Logger):
        self.enabled, self.logger = enabled, logger
        self.bar = None
        self._t0 = time.perf_counter()

    def on_train_begin(self, trainer) -> None:
        if self.enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.cfg.max_steps, initial=trainer.state.step, desc="train", dynamic_ncols=True)

    def on_step_end(self, trainer, metrics: dict) -> None:
        if not self.enabled:
            return
        fresh = self.logger.last and trainer.state.step % self.logger.interval == 0
        if self.bar is not None:
            self.bar.update(1)
            if fresh:
                self.bar.set_postfix(loss=f"{self.logger.last['train/loss']:.4f}",
                                     **({"reward": f"{self.logger.last['grpo/reward']:.3f}"}
                                        if "grpo/reward" in self.logger.last else {}),
                                     lr=f"{self.logger.last['train/lr']:.2e}",
                                     tok_s=f"{self.logger.last['train/tokens_per_sec']:.0f}")
        elif fresh:
            last = self.logger.last
            reward = f"reward {last['grpo/reward']:.3f} " if "grpo/reward" in last else ""  # GRPO's progress
            print(f"step {trainer.state.step}/{trainer.cfg.max_steps} loss {last['train/loss']:.4f} {reward}"
                  f"lr {last['train/lr']:.2e} grad_norm {last['train/grad_norm']:.3f} "
                  f"tok/s {last['train/tokens_per_sec']:.0f} mfu {last['train/mfu']:.3f} "
                  f"elapsed {time.perf_counter() - self._t0:.0f}s", flush=True)

    def on_train_end(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class FrozenReferenceCheck(Callback):
    """DPO's reference model must never change: compare a hash of its parameters at the start and the end."""

    def __init__(self, reference):
        self.reference = reference
        self.start = None

    def on_train_begin(self, trainer) -> None:
        from astrai_ds.training.reference import parameter_checksum

        self.start = parameter_checksum(self.reference.module, getattr(self.reference, "frozen_only", False))

    def on_train_end(self, trainer) -> None:
        from astrai_ds.training.reference import parameter_checksum

        end = parameter_checksum(self.reference.module, getattr(self.reference, "frozen_only", False))
        if end != self.start:
            raise RuntimeError("the DPO reference model changed during training; it must stay frozen")
        trainer.log(f"reference model unchanged (parameter hash {end[:16]} on rank {trainer.dist.rank})")
