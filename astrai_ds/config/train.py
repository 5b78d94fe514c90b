"""The run config: what to train on, for how long, how to log and checkpoint. One dataclass per concern."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from astrai_ds.config.base import FieldError, apply_overrides, check, from_dict, read_config, to_dict


@dataclass
class DataConfig:
    path: str  # a prepared shard folder (`astrai-ds prepare ... --out DIR`)
    seq_len: int = 256  # tokens per training sample
    eval_path: str | None = None  # a prepared shard folder for eval loss; none = no evaluation
    eval_batches: int = 8  # micro-batches per rank in one evaluation
    shuffle: bool = True  # shuffle the samples each epoch (seeded)
    packing: bool = True  # sft: pack several conversations into one sequence (attention stays within each)
    overlong: Literal["truncate", "drop"] = "truncate"  # sft: what to do with a conversation longer than seq_len

    def __post_init__(self):
        check(self.seq_len > 0, "seq_len", f"must be positive, got {self.seq_len}")
        check(self.eval_batches > 0, "eval_batches", f"must be positive, got {self.eval_batches}")


@dataclass
class OptimizerConfig:
    # "adamw" for every parameter; "muon": DeepSpeed's Muon (momentum orthogonalised by Newton-Schulz) for the
    # blocks' matrices, AdamW for the embedding, the head and the norms, as the Muon authors train
    type: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4  # peak learning rate (with muon: of the AdamW part)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on norms)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    muon_lr: float = 0.02  # muon only: the peak learning rate of the blocks' matrices
    muon_momentum: float = 0.95  # muon only: Muon's (Nesterov) momentum

    def __post_init__(self):
        check(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        check(self.muon_lr > 0, "muon_lr", f"must be positive, got {self.muon_lr}")
        check(0 <= self.muon_momentum < 1, "muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              f"must be two numbers in [0, 1), got {list(self.betas)}")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")


@dataclass
class ScheduleConfig:
    type: Literal["cosine", "constant", "wsd", "linear"] = "cosine"  # shape after warm-up
    warmup_steps: int = 100  # linear warm-up from 0 to the peak lr
    min_lr_ratio: float = 0.1  # final lr as a fraction of the peak (cosine, linear, wsd)
    decay_fraction: float = 0.2  # wsd only: the share of the steps spent decaying at the end
    total_steps: int | None = None  # steps the schedule spans; none = max_steps

    def __post_init__(self):
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        check(0 < self.decay_fraction <= 1, "decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        check(self.total_steps is None or self.total_steps > 0, "total_steps", "must be positive")


@dataclass
class StageConfig:
    # pretraining, supervised fine-tuning, preference optimisation, reinforcement learning from verifiable rewards
    type: Literal["pt", "sft", "dpo", "grpo"] = "pt"
    init_from: str | None = None  # an exported model folder to start from (fresh optimizer); none = random init

    # Keys that lived here before DPO got its own section: a config that still has them gets told where they went.
    MOVED = {k: f"dpo.{k}" for k in ("beta", "loss_type", "label_smoothing", "sft_weight", "gamma", "reference",
                                     "reference_model", "reference_offload")}


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")  # the keys of training.losses.DPO_LOSSES
SMOOTHED_LOSS_TYPES = ("sigmoid", "simpo")  # the loss types that use label_smoothing
SIMPO_GAMMA = 0.5  # SimPO's default target margin, as TRL's CPOConfig.simpo_gamma


@dataclass
class DPOConfig:
    """Preference optimisation (stage.type "dpo"): the loss and the frozen reference model."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"  # simpo needs no reference model
    beta: float = 0.1  # strength of the pull towards the reference (simpo: reward scale, around 2)
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped preference labels (sigmoid, simpo)
    # simpo only: the target reward margin; SimPO's own code writes gamma_beta_ratio = gamma / beta. none = 0.5
    gamma: float | None = None
    sft_weight: float = 0.0  # RPO: add this times the chosen responses' token NLL to the preference loss
    reference: Literal["live", "precomputed"] = "live"  # live: a frozen engine each step; precomputed: one pass first
    reference_model: str | None = None  # the reference model folder; none = stage.init_from
    reference_offload: bool = False  # live reference under ZeRO-3: keep its parameters in host memory

    def __post_init__(self):
        check(self.beta > 0, "beta", f"must be positive, got {self.beta}")
        check(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        check(self.label_smoothing == 0 or self.loss_type in SMOOTHED_LOSS_TYPES, "label_smoothing",
              f"applies to loss_type {' or '.join(map(repr, SMOOTHED_LOSS_TYPES))} only, not {self.loss_type!r}; "
              f"set it to 0")
        check(self.gamma is None or self.loss_type == "simpo", "gamma",
              f"is SimPO's target margin and has no effect on loss_type {self.loss_type!r}; remove it")
        check(self.gamma is None or self.gamma >= 0, "gamma", f"must be >= 0, got {self.gamma}")
        check(self.sft_weight >= 0, "sft_weight", f"must be >= 0, got {self.sft_weight}")

    @property
    def simpo_gamma(self) -> float:
        return SIMPO_GAMMA if self.gamma is None else self.gamma

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"


GRPO_DEFAULT_REWARDS = {"exact": 1.0, "format": 0.5}


@dataclass
class GRPOConfig:
    """Group relative policy optimisation (stage.type "grpo"): rollouts from the policy through the generation
    engine, rewarded by verifiable checks, trained with a clipped ratio against group-normalised advantages.
    micro_batch_size counts completions; each rank's micro_batch_size x grad_accum_steps completions of a step are
    whole groups of group_size completions of one prompt."""

    group_size: int = 8  # completions per prompt; the advantage compares each with its group
    # reward functions and their weights: built-in "exact" (the right value) and "format" (the preferred style),
    # or a function of yours, "module:function" or "path/to/file.py:function", taking (prompt, response, record)
    rewards: dict = field(default_factory=lambda: dict(GRPO_DEFAULT_REWARDS))
    max_new_tokens: int = 48  # tokens generated per completion at most
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling of the rollouts
    clip_low: float = 0.2  # the ratio is clipped below at 1 - clip_low
    clip_high: float = 0.28  # and above at 1 + clip_high (DAPO's clip-higher)
    beta: float = 0.0  # weight of the KL term (k3 estimator) against the frozen reference; 0: no reference model
    reference_model: str | None = None  # the reference's model folder when beta > 0; none = stage.init_from
    num_iterations: int = 1  # optimizer steps on each rollout batch (the ratio is taken to the rollout's log-probs)
    scale_rewards: bool = True  # divide the advantages by the group's standard deviation (false: Dr. GRPO)
    mask_truncated: bool = False  # completions cut at max_new_tokens take no part in the loss
    epsilon: float = 1e-4  # added to the group's standard deviation
    # rollouts decode through compiled graphs (torch.compile; compiled in the first rollout, weights as inputs)
    compile_rollouts: bool = False

    def __post_init__(self):
        check(self.group_size >= 2, "group_size", f"must be at least 2, got {self.group_size}: advantages compare "
              "the completions of one prompt, so with one they are all zero and nothing trains")
        check(bool(self.rewards), "rewards", "is empty: name at least one reward, e.g. {\"exact\": 1.0}")
        check(self.max_new_tokens > 0, "max_new_tokens", f"must be positive, got {self.max_new_tokens}")
        check(self.temperature > 0, "temperature", f"must be positive (rollouts are sampled), got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(0 <= self.clip_low < 1, "clip_low", f"must be in [0, 1), got {self.clip_low}")
        check(self.clip_high >= 0, "clip_high", f"must be >= 0, got {self.clip_high}")
        check(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        check(self.num_iterations >= 1, "num_iterations", f"must be at least 1, got {self.num_iterations}")
        check(self.epsilon > 0, "epsilon", f"must be positive, got {self.epsilon}")


LORA_DEFAULT_TARGET = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]  # every attention and MLP projection


@dataclass
class LoraConfig:
    """Low-rank adapters (model.lora): the base weights frozen, only the adapters trained. r 0: off."""
    r: int = 0  # the adapters' rank; 0 trains every weight (no LoRA)
    alpha: float = 16.0  # the adapters' output is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input while training
    # linear layers by their own name (wq, wk, wv, wo: attention; w1, w2, w3: MLP), or "re:PATTERN" over the
    # dotted names (e.g. "re:layers\\.[0-3]\\..*")
    target: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGET))

    def __post_init__(self):
        check(self.r >= 0, "r", f"must be >= 0 (0: no LoRA), got {self.r}")
        check(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(bool(self.target), "target", "is empty: name the linear layers to adapt (default: all projections)")
        for t in self.target:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise FieldError("target", f"{t!r} is not a valid regular expression ({e})") from None

    @property
    def enabled(self) -> bool:
        return self.r > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass
class EarlyStopConfig:
    patience: int = 0  # stop after this many evaluations without improvement; 0 disables
    min_delta: float = 0.0  # an improvement smaller than this does not count


@dataclass
class CpuConfig:
    # CPU ranks all on one host: "auto" sends ZeRO's all-reduces and all-gathers through DeepSpeed's
    # shared-memory kernel (about 3x faster than gloo over loopback); "gloo" keeps every collective on gloo.
    collectives: Literal["auto", "gloo"] = "auto"
    # glibc malloc keeps freed memory for reuse instead of handing large blocks back to the OS, so each step's
    # big temporaries (activations, flat gradient copies) are not page-faulted in again; the process keeps
    # its peak memory.
    keep_freed_memory: bool = True


PARTITION_METHODS = ("parameters", "uniform")  # DeepSpeed's; also "type:REGEX" (layers whose class matches)


@dataclass
class ParallelConfig:
    """How the ranks split the model beyond data parallelism."""

    pipeline_stages: int = 1  # pipeline stages (DeepSpeed's PipelineModule); the ranks are stages x data-parallel
    # how the layers are split over the stages: "parameters" (balanced parameter counts), "uniform" (the same
    # number of layers), or "type:REGEX" (the same number of layers whose class matches, e.g. "type:BlockPipe")
    partition_method: str = "parameters"

    def __post_init__(self):
        check(self.pipeline_stages >= 1, "pipeline_stages", f"must be >= 1, got {self.pipeline_stages}")
        method = self.partition_method
        check(method in PARTITION_METHODS or (method.startswith("type:") and len(method) > 5), "partition_method",
              f"must be \"parameters\", \"uniform\" or \"type:REGEX\" (e.g. \"type:BlockPipe\"), got {method!r}")


@dataclass
class TrainConfig:
    model: str | None  # path to a model config (configs/model/*.json); null when stage.init_from gives the shape
    tokenizer: str  # a tokenizer folder or tokenizer.json (`astrai-ds tokenizer ...`)
    data: DataConfig  # training (and eval) data
    output_dir: str  # the run folder: checkpoints, tb/, metrics.jsonl, resolved configs
    max_steps: int = 1000  # optimizer steps to train for
    micro_batch_size: int = 8  # samples per rank per forward ("auto" in the DeepSpeed config takes it)
    grad_accum_steps: int = 1  # micro-batches per optimizer step ("auto" in the DeepSpeed config)
    save_interval: int = 500  # steps between checkpoints (a final one is always written)
    log_interval: int = 10  # steps between log lines, metrics.jsonl and TensorBoard points
    eval_interval: int = 200  # steps between evaluations (needs data.eval_path)
    keep_checkpoints: int = 2  # newest checkpoints kept in output_dir; 0 keeps all
    seed: int = 1234  # seeds the model init and the data order
    resume: str = "auto"  # "auto" (newest checkpoint in output_dir, if any), "none", or a checkpoint folder
    precision: Literal["bf16", "fp32", "auto"] = "auto"  # "auto": bf16 where the device supports it
    activation_checkpointing: bool = False  # recompute block activations in backward to save memory
    # the training losses from the head in chunks of tokens, without the whole (B, T, V) logits (pipeline stages:
    # unfused, from logits on the last stage)
    fused_loss: bool = True
    # the model compiled with torch.compile (inductor: C++/OpenMP on a CPU, Triton on a GPU) through DeepSpeed's
    # engine.compile(); the first step compiles (its kernels cached per machine for the next run)
    compile: bool = False
    cpu: CpuConfig = field(default_factory=CpuConfig)  # settings that apply on DeepSpeed's CPU accelerator only
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # pipeline stages
    stage: StageConfig = field(default_factory=StageConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)  # stage.type "dpo" only
    grpo: GRPOConfig = field(default_factory=GRPOConfig)  # stage.type "grpo" only
    lora: LoraConfig = field(default_factory=LoraConfig)  # low-rank adapters (r > 0); the base weights frozen
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    def __post_init__(self):
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "save_interval", "log_interval",
                    "eval_interval"):
            check(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        check(self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0")
        check(bool(self.output_dir.strip()), "output_dir", "is empty; name the run folder, e.g. runs/mine")
        check(self.stage.type != "dpo" or not self.dpo.needs_reference or self.reference_path is not None,
              "dpo.reference_model", "is needed for DPO: set stage.init_from (the SFT model folder) or "
              "dpo.reference_model")
        check(self.stage.type != "dpo" or self.parallel.pipeline_stages == 1, "parallel.pipeline_stages",
              f"is {self.parallel.pipeline_stages}, but DPO does not run on pipeline stages (its frozen reference "
              f"would need stages of its own); train DPO with pipeline_stages 1 and ZeRO-3 (ds_configs/zero3.json) "
              f"to shard a large model")
        check(self.stage.type != "grpo" or self.parallel.pipeline_stages == 1, "parallel.pipeline_stages",
              f"is {self.parallel.pipeline_stages}, but GRPO does not run on pipeline stages (its rollouts need the "
              f"whole model on each rank); train GRPO with pipeline_stages 1 and ZeRO-3 to shard a large model")
        check(self.stage.type != "grpo" or self.grpo.beta == 0 or self.lora.enabled or self.reference_path is not None,
              "grpo.reference_model",
              "is needed for a KL term (grpo.beta > 0): set stage.init_from (the model GRPO starts from) or "
              "grpo.reference_model, or set grpo.beta to 0")
        check(self.stage.type != "grpo" or self.data.eval_path is None, "data.eval_path",
              "has no GRPO evaluation loss: remove it, and score the exported model with `astrai-ds eval --chat`")
        check(self.optimizer.type != "muon" or not self.lora.enabled, "optimizer.type",
              "is muon, but LoRA's adapters are low-rank factors, not the weight matrices Muon orthogonalises: train "
              "LoRA with optimizer.type adamw")
        check(self.optimizer.type != "muon" or self.parallel.pipeline_stages == 1, "optimizer.type",
              "is muon, which does not run on pipeline stages yet: use optimizer.type adamw, or pipeline_stages 1 "
              "with ZeRO-3 to shard a large model")
        check(not self.compile or self.parallel.pipeline_stages == 1, "compile",
              "is true, but compiling does not run on pipeline stages yet: set compile false, or pipeline_stages 1 "
              "(ZeRO-3 shards a large model)")
        check(not self.lora.enabled or self.parallel.pipeline_stages == 1, "lora.r",
              "is set, but LoRA does not run on pipeline stages yet: train with pipeline_stages 1 (ZeRO-3 shards "
              "the frozen base)")

    @property
    def reference_model(self) -> str | None:
        """The stage's own reference model folder: grpo.reference_model for GRPO, else dpo.reference_model."""
        return (self.grpo if self.stage.type == "grpo" else self.dpo).reference_model

    @property
    def reference_path(self) -> str | None:
        """The frozen reference's model folder (DPO's, GRPO's KL term): the stage's own reference_model, else the
        folder the policy starts from."""
        return self.reference_model or self.stage.init_from

    @property
    def reference_key(self) -> str:
        """The key that names reference_path, for messages."""
        return f"{self.stage.type}.reference_model" if self.reference_model else "stage.init_from"

    @property
    def schedule_steps(self) -> int:
        return self.schedule.total_steps or self.max_steps

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> "TrainConfig":
        """Load a train config (JSON, or YAML for `.yaml`/`.yml`); `overrides` are `a.b=value` strings applied on
        top (`--set`)."""
        data = apply_overrides(read_config(path, "train config"), overrides or [])
        source = str(path) + (" (with --set overrides)" if overrides else "")
        return from_dict(cls, data, source)

    def to_dict(self) -> dict:
        return to_dict(self)
