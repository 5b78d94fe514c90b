"""The training loop: one short `fit` shared by every stage; the strategy computes the loss, the DeepSpeed
engine owns backward, gradient accumulation, clipping and the optimizer step, callbacks do the rest."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from astrai_ds.config.train import TrainConfig
from astrai_ds.training.batches import BatchIterator
from astrai_ds.training.callbacks import CALLBACK_ORDER, Callback
from astrai_ds.training.checkpoint import set_rng_state
from astrai_ds.training.distributed import DistInfo, all_reduce_host


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # non-padding tokens through the policy, all ranks
    eval_loss: float | None = None  # the latest evaluation
    eval_step: int = -1  # the step it was taken at
    should_stop: bool = False  # set by a callback (early stop, a signal, a lost launcher)


class Trainer:
    def __init__(self, engine, strategy, train_batches: BatchIterator, eval_batches: BatchIterator | None,
                 cfg: TrainConfig, dist_info: DistInfo):
        self.engine, self.strategy, self.cfg, self.dist = engine, strategy, cfg, dist_info
        self.train_batches, self.eval_batches = train_batches, eval_batches
        # Every evaluation reads the same eval samples: rewind the eval sampler to its start each time.
        self._eval_start = eval_batches.sampler.state_dict() if eval_batches else None
        self.callbacks: list[Callback] = []
        self.state = TrainState()
        self.start_step = 0
        self.accum = engine.gradient_accumulation_steps()
        # Pipeline stages: the engine runs the micro-batch loop. Every stage of a replica draws the same batches,
        # so the counts summed over all ranks hold each batch once per stage.
        self.pipeline = None
        self.stages = getattr(engine, "num_stages", 1)
        if self.stages > 1:
            from astrai_ds.training.pipeline import PipelineDriver

            self.pipeline = PipelineDriver(engine, strategy)
        # Training FLOPs per token for a context of T (forward + backward); set by the builder for MFU.
        self.flops_per_token: Callable[[int], float] | None = None
        self.run_lock = None  # the output folder's lock (training/guard.py), held as long as the trainer lives

    def add_callbacks(self, *callbacks: Callback) -> None:
        """Callbacks run in CALLBACK_ORDER whatever order they are added in (see callbacks.py for why)."""
        self.callbacks = sorted([*self.callbacks, *callbacks], key=lambda cb: CALLBACK_ORDER.index(cb.name))

    def fit(self) -> TrainState:
        self.start_step = self.state.step
        for cb in self.callbacks:
            cb.on_train_begin(self)
        while self.state.step < self.cfg.max_steps and not self.state.should_stop:
            first = time.perf_counter()
            metrics = self.train_step()
            if self.state.step == self.start_step and getattr(self.engine, "is_compiled", False):
                self.log(f"compile: the first step took {time.perf_counter() - first:.1f}s, compiling included")
            self.state.step += 1
            self.state.tokens_seen += int(metrics["tokens"])
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.state

    def train_step(self) -> dict:
        """One optimizer step over the global batch: `accum` micro-batches on every rank.

        The step's micro-batches are drawn first and counted over all ranks, so each micro-batch's loss is
        its share of the global batch's loss (a sum divided by the global count) and the gradient does not
        depend on how the batch is split. DeepSpeed averages gradients over the data-parallel ranks, so each
        rank's loss is scaled up by their number, and it must not divide by the accumulation steps again.
        Returns the strategy's metrics (this rank's shares, summed over micro-batches), lr, grad norm, and
        the global batch's non-padding tokens ("tokens") and executed FLOPs ("flops"). The metrics and the grad
        norm stay tensors on the model's device: the logger reads them on the host once per logged step, so a step
        waits for no kernel (on a GPU) until a line is written.
        """
        start = time.perf_counter()
        self.engine.train()
        lr = self.engine.get_lr()[0]  # the lr this step uses (the scheduler moves it inside engine.step)
        batches = [self.train_batches.next() for _ in range(self.accum)]
        totals = self.global_counts(batches)
        own_norm = None
        if self.pipeline is not None:
            sums = self.pipeline.train(batches, totals)
        else:
            sums: dict[str, torch.Tensor] = {}
            for i, batch in enumerate(batches):
                loss, metrics = self.strategy.compute_loss(self.engine, batch, totals)
                self.engine.backward(loss * self.engine.dp_world_size, scale_wrt_gas=False)
                if i == len(batches) - 1 and not hasattr(self.engine.optimizer, "_global_grad_norm"):
                    # Without ZeRO or a 16-bit wrapper the optimizer is ours: DeepSpeed clips the (all-reduced)
                    # gradients but keeps no norm, so take it here, before the step clears them.
                    own_norm = torch.nn.utils.get_total_norm(
                        [p.grad for p in self.engine.module.parameters() if p.grad is not None])
                self.engine.step()  # steps the optimizer only at the accumulation boundary
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value
        grad_norm = self.engine.get_global_grad_norm() if own_norm is None else own_norm
        step_metrics = getattr(self.train_batches, "step_metrics", None)  # GRPO's rollouts: rewards, lengths, time
        if step_metrics is not None:
            sums.update(step_metrics(time.perf_counter() - start))
        # totals come from all_reduce_host: on the host already
        return {"metrics": sums, "lr": lr, "tokens": totals["inputs"].item(), "flops": totals["flops"].item(),
                "grad_norm": grad_norm}

    def global_counts(self, batches: list[dict]) -> dict[str, torch.Tensor]:
        """The strategy's counts summed over `batches` and all ranks, plus the FLOPs they take ("flops"):
        one all-reduce of a few numbers."""
        per_batch = [self.strategy.counts(b) | {"flops": torch.tensor(self._flops(b), dtype=torch.float64)}
                     for b in batches]
        keys = sorted(per_batch[0])  # the same order on every rank
        local = torch.stack([torch.stack([c[k].to("cpu", torch.float64) for k in keys]) for c in per_batch]).sum(0)
        return dict(zip(keys, all_reduce_host(local) / self.stages))

    def _flops(self, batch: dict) -> float:
        """FLOPs this micro-batch executes: the policy's forward and backward over its padded shape, plus the
        recomputed forward under activation checkpointing and a live reference model's forward (a forward
        is a third of forward + backward)."""
        if self.flops_per_token is None:
            return 0.0
        rows, T = self.strategy.policy_shape(batch)
        forwards = 3 + self.cfg.activation_checkpointing + self.strategy.reference_forward  # in units of 1 forward
        return rows * T * self.flops_per_token(T) * forwards / 3

    @torch.no_grad()
    def evaluate(self) -> float:
        """The loss of the first `data.eval_batches` micro-batches of every rank's eval slice, as one batch:
        the same definition as training's (e.g. summed token loss / trained tokens of all of them)."""
        self.engine.eval()
        self.eval_batches.sampler.load_state_dict(self._eval_start)
        batches = [self.eval_batches.next() for _ in range(self.cfg.data.eval_batches)]
        totals = self.global_counts(batches)
        total = torch.zeros(1, dtype=torch.float64)
        if self.pipeline is not None:
            total += self.pipeline.evaluate(batches, totals).item()
        else:
            for batch in batches:
                total += self.strategy.compute_loss(self.engine, batch, totals)[0].item()
        all_reduce_host(total)
        self.engine.train()
        return total.item()

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    # Everything a resumed run needs besides the engine's own (weights, optimizer, LR schedule). Called on
    # every rank (a callback's state_dict may run a collective); rank 0's copy is the one saved.
    def state_dict(self) -> dict:
        sd = {"trainer": asdict(self.state), "sampler": self.train_batches.state_dict(), "callbacks": {}}
        for cb in self.callbacks:
            if cb.stateful:
                sd["callbacks"][cb.name] = cb.state_dict(self)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.state = TrainState(**{**sd["trainer"], "should_stop": False})
        self.train_batches.load_state_dict(sd["sampler"])
        for cb in self.callbacks:
            if cb.stateful and cb.name in sd.get("callbacks", {}):
                cb.load_state_dict(sd["callbacks"][cb.name], self)
        if "rng" in sd and self.dist.rank < len(sd["rng"]):
            set_rng_state(sd["rng"][self.dist.rank])
