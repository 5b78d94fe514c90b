"""GRPO's data: micro-batches made by rollouts of the policy itself, through the generation engine.

`RolloutBatches` has the interface of `BatchIterator` (`next`, `state_dict`, `load_state_dict`, `sampler`), so the
one training loop drives GRPO as it drives the other stages. When a step asks for data and the current rollout
batch has trained its `num_iterations` steps, a new rollout runs on every rank at once:

1. the policy's current weights are copied into an inference copy of the model (under ZeRO-3 gathered once, all
   parameters together; LoRA adapters merged into their weights), so generation runs on plain tensors, with no
   ZeRO hooks and no gradient bookkeeping;
2. this rank's share of the step's prompts, `group_size` completions each, goes through the continuous-batching
   engine (`inference.engine.LLMEngine`) in one `generate_batch`: every completion has its own seed, drawn from
   the run's seed, the rollout's number, the prompt's index and the completion's index, so a rollout does not
   depend on the rank it runs on or on what it is batched with, and a resumed run samples what the interrupted
   one would have;
3. each completion is scored by the reward functions (training/rewards.py), and its advantage is its reward minus
   its group's mean, divided by the group's standard deviation plus epsilon (`scale_rewards`);
4. with `num_iterations` > 1 the policy's log-probs of the sampled tokens are computed once (the old log-probs the
   ratio of the later steps is taken to), and with a KL term the reference's.

The rollout batch is then `grad_accum_steps` micro-batches on this rank, handed out once per iteration. Its metrics
(rewards, lengths, time) come back through `step_metrics` as each rank's share, like the strategy's.
"""

from __future__ import annotations

import hashlib
import time

import torch
import torch.distributed as dist

from astrai_ds.config.train import GRPOConfig
from astrai_ds.data.sampler import DistributedBatchSampler
from astrai_ds.model.losses import IGNORE_INDEX, token_logps
from astrai_ds.training.distributed import DistInfo, all_reduce_host
from astrai_ds.training.strategies import policy_logps


def completion_seed(seed: int, rollout: int, index: int, sample: int) -> int:
    """The sampling seed of completion `sample` of prompt `index` in rollout `rollout` (63 bits)."""
    digest = hashlib.blake2b(f"{seed}:{rollout}:{index}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def group_advantages(rewards: torch.Tensor, scale: bool = True, epsilon: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) of P groups of G completions -> advantages (P, G): reward minus its group's mean, divided by the
    group's (unbiased) standard deviation plus epsilon when `scale`."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + epsilon) if scale else centred


def completion_rows(prompt: list[int], completion: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one prompt and its completion (the stop token included): the next-token labels, with
    IGNORE_INDEX on every position that predicts a prompt token."""
    ids = list(prompt) + list(completion)
    labels = [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt):]
    return ids[:-1], labels


def collate_rollout(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad rows ({"input_ids", "labels", "advantage"}) into one micro-batch."""
    T = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
    return {"input_ids": input_ids, "labels": labels,
            "advantages": torch.tensor([r["advantage"] for r in rows], dtype=torch.float32),
            "num_tokens": torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.long)}


class RolloutBatches:
    def __init__(self, engine, model_cfg, tokenizer, records: list[dict], prompts: list[list[int]], cfg,
                 micro: int, accum: int, dist_info: DistInfo, rewards: list, source: str, reference=None,
                 dtype: torch.dtype = torch.float32):
        self.engine, self.model_cfg, self.tokenizer = engine, model_cfg, tokenizer
        self.records, self.prompts, self.rewards, self.source = records, prompts, rewards, source
        self.grpo: GRPOConfig = cfg.grpo
        self.seed, self.seq_len, self.lora = cfg.seed, cfg.data.seq_len, cfg.lora
        self.micro, self.accum, self.dist, self.reference, self.dtype = micro, accum, dist_info, reference, dtype
        self.fused = cfg.fused_loss  # the old log-probs as the strategy computes the policy's (GRPO has no stages)
        self.device = engine.device
        self.prompts_per_rank = micro * accum // self.grpo.group_size
        self.sampler = DistributedBatchSampler(len(prompts), self.prompts_per_rank, dist_info.rank,
                                               dist_info.world_size, cfg.seed, shuffle=cfg.data.shuffle)
        self.rollouts = 0  # rollouts done: numbers the sampling seeds
        self._buffer: list[dict] = []  # this rank's micro-batches of the current rollout (on the CPU)
        self._metrics: dict[str, float] = {}  # this rank's shares of the current rollout's metrics
        self._handed = 0  # micro-batches handed out from the current rollout, over its iterations
        self._rollout_seconds = 0.0  # spent on a rollout since the last step_metrics
        self._model = None  # the inference copy of the policy
        self._warm = False  # warm_up has run in this process (a resumed run warms up in its first rollout too)
        self.compile = self.grpo.compile_rollouts and self._can_compile()  # off for good after a failure

    # ------------------------------------------------------------------ the BatchIterator interface

    def next(self) -> dict:
        if self._handed >= len(self._buffer) * self.grpo.num_iterations:
            self._rollout()
        batch = self._buffer[self._handed % len(self._buffer)]
        self._handed += 1
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def step_metrics(self, step_seconds: float) -> dict[str, float]:
        """The metrics of the rollout batch this step trained on, as this rank's shares (summed over the ranks they
        give the global value), and the step's time split between rollout and training."""
        world = self.dist.world_size
        rollout, self._rollout_seconds = self._rollout_seconds, 0.0
        return {**self._metrics, "grpo/rollout_seconds": rollout / world,
                "grpo/train_seconds": (step_seconds - rollout) / world}

    def state_dict(self) -> dict:
        """Every rank's unfinished rollout batch travels with rank 0's state (a collective: call it on every rank),
        so a run stopped between the iterations of one rollout resumes on the same completions."""
        pending = self._handed < len(self._buffer) * self.grpo.num_iterations
        mine = {"buffer": self._buffer, "metrics": self._metrics, "handed": self._handed} if pending else None
        every = [None] * self.dist.world_size
        dist.all_gather_object(every, mine)
        return {"sampler": self.sampler.state_dict(), "rollouts": self.rollouts, "pending": every}

    def load_state_dict(self, sd: dict) -> None:
        self.sampler.load_state_dict(sd["sampler"])
        self.rollouts = sd["rollouts"]
        pending = sd.get("pending") or []
        if any(p is not None for p in pending) and len(pending) != self.dist.world_size:
            if self.dist.is_main:
                print(f"resume: the checkpoint's unfinished rollout batch was made on {len(pending)} ranks and this "
                      f"run has {self.dist.world_size}: its remaining iterations are skipped, training goes on "
                      f"with a new rollout", flush=True)
            return
        mine = pending[self.dist.rank] if pending else None
        if mine is not None:
            self._buffer, self._metrics, self._handed = mine["buffer"], mine["metrics"], mine["handed"]

    # ------------------------------------------------------------------ one rollout

    def _rollout(self) -> None:
        start = time.perf_counter()
        indices = self.sampler.next_indices()
        model = self._sync_weights()
        generate_start = time.perf_counter()
        completions = self._generate(model, indices)
        generate_seconds = time.perf_counter() - generate_start
        rewards, components = self._score(indices, completions)
        G = self.grpo.group_size
        advantages = group_advantages(rewards.view(-1, G), self.grpo.scale_rewards, self.grpo.epsilon).flatten()
        rows = []
        for n, c in enumerate(completions):
            tokens = c.token_ids + ([c.stop_token_id] if c.stop_token_id is not None else [])
            input_ids, labels = completion_rows(self.prompts[indices[n // G]], tokens)
            if self.grpo.mask_truncated and c.finish_reason == "length":
                labels = [IGNORE_INDEX] * len(labels)
            rows.append({"input_ids": input_ids, "labels": labels, "advantage": float(advantages[n])})
        self._buffer = [collate_rollout(rows[k:k + self.micro]) for k in range(0, len(rows), self.micro)]
        self._add_logps()
        self._handed = 0
        self.rollouts += 1
        self._rollout_seconds += time.perf_counter() - start
        self._metrics = self._rollout_metrics(rewards, components, completions, generate_seconds)

    @torch.no_grad()
    def _sync_weights(self) -> torch.nn.Module:
        """The inference copy of the policy with the policy's current weights (LoRA adapters merged)."""
        from astrai_ds.model import Transformer
        from astrai_ds.model.lora import merged_state_dict

        if self._model is None:
            with torch.random.fork_rng(devices=[]):  # its init must not move the run's RNG (dropout, resume)
                self._model = Transformer(self.model_cfg).to(self.device, self.dtype)
            self._model.requires_grad_(False).eval()
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()),
                                               enabled=self.engine.zero_optimization_stage() == 3):
            state = {name: p.detach() for name, p in module.named_parameters()}
            if self.lora.enabled:
                state = merged_state_dict(state, self.lora.scale)
            for name, p in self._model.named_parameters():
                p.copy_(state[name])
        return self._model

    def _generate(self, model, indices: list[int]) -> list:
        """The completions of this rank's prompts, group_size each, in prompt order, from one engine run."""
        from astrai_ds.inference.engine import EngineConfig, LLMEngine
        from astrai_ds.inference.sampling import SamplingParams

        G, cfg = self.grpo.group_size, self.grpo
        prompts, params = [], []
        for index in indices:
            prompt = self.prompts[index]
            for j in range(G):
                prompts.append(prompt)
                params.append(SamplingParams(max_new_tokens=min(cfg.max_new_tokens, self.seq_len - len(prompt)),
                                             temperature=cfg.temperature, top_p=cfg.top_p,
                                             seed=completion_seed(self.seed, self.rollouts, index, j)))
        longest = max(len(p) for p in prompts) + cfg.max_new_tokens
        engine = LLMEngine(model, self.tokenizer, EngineConfig(
            kv_cache_tokens=len(prompts) * longest + 16, max_num_seqs=len(prompts),
            max_num_batched_tokens=max(2048, len(prompts)),
            # the inference copy's weights are overwritten every rollout: compiled graphs read them as inputs
            compile=self.compile, frozen_weights=False))
        if self.compile and not self._warm:
            engine.warm_up()  # both graphs in the run's first rollout, not whenever one is first needed
            self._warm = True
        completions = engine.generate_batch(prompts, params)
        if self.compile and getattr(engine.runner.compiled, "failed", None) is not None:
            self.compile = False  # the engine said why in one line; later rollouts do not try again
        failed = next((c for c in completions if c.error is not None or c.finish_reason == "error"), None)
        if failed is not None:
            raise RuntimeError(f"a rollout request failed: {failed.error}")
        return completions

    def _can_compile(self) -> bool:
        """Whether rollouts can decode through compiled graphs here: not on a CPU without a C++ compiler (one line
        from the main rank says so)."""
        from astrai_ds.extensions import no_cpp_compiler

        if self.device.type == "cpu" and (line := no_cpp_compiler("rollouts decode eager",
                                                                   "set grpo.compile_rollouts false")):
            if self.dist.is_main:
                print(line, flush=True)
            return False
        return True

    def _score(self, indices: list[int], completions: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(rewards (N,), {reward name: raw values (N,)}) of this rank's completions."""
        from astrai_ds.data.prompts import prompt_messages
        from astrai_ds.training.rewards import score

        G = self.grpo.group_size
        totals, components = [], {r.metric: [] for r in self.rewards}
        metric = {r.name: r.metric for r in self.rewards}
        for n, c in enumerate(completions):
            index = indices[n // G]
            record = self.records[index]
            total, parts = score(self.rewards, prompt_messages(record), c.text, record,
                                 f"{self.source} record {index + 1}")
            totals.append(total)
            for name, value in parts.items():
                components[metric[name]].append(value)
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return as_tensor(totals), {name: as_tensor(v) for name, v in components.items()}

    @torch.no_grad()
    def _add_logps(self) -> None:
        """The old log-probs (num_iterations > 1) and the reference's (beta > 0) of every micro-batch: forward
        passes on every rank alike (collectives under ZeRO-3)."""
        old, ref = self.grpo.num_iterations > 1, self.grpo.beta > 0
        if not (old or ref):
            return
        was_training = self.engine.training
        self.engine.eval()
        for batch in self._buffer:
            input_ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
            if old:
                batch["old_logps"] = policy_logps(self.engine, input_ids, labels, self.fused).cpu()
            if ref:
                batch["ref_logps"] = token_logps(self.reference(input_ids), labels).cpu()
        self.engine.train(was_training)

    def _rollout_metrics(self, rewards: torch.Tensor, components: dict, completions: list, seconds: float) -> dict:
        """This rank's shares of the rollout's metrics: means over the global batch's completions (or groups), the
        global reward std divided by the number of ranks, and this rank's generated tokens per second of generation."""
        G, world = self.grpo.group_size, self.dist.world_size
        lengths = torch.tensor([len(c.token_ids) + (c.stop_token_id is not None) for c in completions],
                               dtype=torch.float64)
        groups = rewards.view(-1, G)
        equal = (groups == groups[:, :1]).all(dim=1).sum()
        n = torch.tensor(float(len(completions)), dtype=torch.float64)
        sums = torch.stack([rewards.sum(), (rewards ** 2).sum(), n])
        total, total_sq, count = all_reduce_host(sums).tolist()
        mean = total / count
        std = max(total_sq / count - mean ** 2, 0.0) ** 0.5 * (count / max(count - 1, 1)) ** 0.5
        metrics = {"grpo/reward": rewards.sum().item() / count, "grpo/reward_std": std / world,
                   "grpo/groups_all_equal": equal.item() / (count / G),
                   "grpo/completion_length": lengths.sum().item() / count,
                   "grpo/truncated": sum(c.finish_reason == "length" for c in completions) / count,
                   "grpo/rollout_tokens_per_sec": lengths.sum().item() / max(seconds, 1e-9)}
        for name, values in components.items():
            metrics[f"grpo/reward/{name}"] = values.sum().item() / count
        return metrics
