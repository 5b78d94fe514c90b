"""The training loop: one short `fit` shared by every stage; the strategy computes the loss, the DeepSpeed
engine owns backward, gradient accumulation, clipping and the optimizer step, callbacks do the rest."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from astrai_ds.config.train import TrainConfig
from astrai_ds.training.batches import BatchIterator
from astrai_ds.training.callbacks import Callback
from astrai_ds.training.checkpoint import set_rng_state
from astrai_ds.training.distributed import DistInfo, all_reduce_host


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0  # tokens consumed by all ranks
    eval_loss: float | None = None  # the latest evaluation
    eval_step: int = -1  # the step it was taken at
    should_stop: bool = False  # set by a callback (early stop)


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
        self.tokens_per_step = (engine.train_micro_batch_size_per_gpu() * self.accum * dist_info.world_size
                                * cfg.data.seq_len)

    def fit(self) -> TrainState:
        self.start_step = self.state.step
        for cb in self.callbacks:
            cb.on_train_begin(self)
        while self.state.step < self.cfg.max_steps and not self.state.should_stop:
            metrics = self.train_step()
            self.state.step += 1
            self.state.tokens_seen += self.tokens_per_step
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.state

    def train_step(self) -> dict:
        """One optimizer step: `accum` micro-batches through forward and backward, then the engine steps.
        Returns the loss and the strategy's other metrics (means over the micro-batches), lr and grad norm."""
        self.engine.train()
        lr = self.engine.get_lr()[0]  # the lr this step uses (the scheduler moves it inside engine.step)
        sums: dict[str, float] = {}
        for _ in range(self.accum):
            loss, metrics = self.strategy.compute_loss(self.engine, self.train_batches.next())
            self.engine.backward(loss)
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        grad_norm = self.engine.get_global_grad_norm()
        return {"metrics": {k: v / self.accum for k, v in sums.items()}, "lr": lr, "tokens": self.tokens_per_step,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first `data.eval_batches` micro-batches of every rank's eval slice."""
        self.engine.eval()
        self.eval_batches.sampler.load_state_dict(self._eval_start)
        total = torch.zeros(2, dtype=torch.float64)
        for _ in range(self.cfg.data.eval_batches):
            loss, _ = self.strategy.compute_loss(self.engine, self.eval_batches.next())
            total += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        all_reduce_host(total)
        self.engine.train()
        return (total[0] / total[1]).item()

    def log(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    # Everything a resumed run needs besides the engine's own (weights, optimizer, LR schedule).
    def state_dict(self) -> dict:
        sd = {"trainer": asdict(self.state), "sampler": self.train_batches.state_dict(), "callbacks": {}}
        for cb in self.callbacks:
            if hasattr(cb, "state_dict"):
                sd["callbacks"][type(cb).__name__] = cb.state_dict()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.state = TrainState(**{**sd["trainer"], "should_stop": False})
        self.train_batches.load_state_dict(sd["sampler"])
        for cb in self.callbacks:
            if type(cb).__name__ in sd.get("callbacks", {}):
                cb.load_state_dict(sd["callbacks"][type(cb).__name__])
        if "rng" in sd and self.dist.rank < len(sd["rng"]):
            set_rng_state(sd["rng"][self.dist.rank])
