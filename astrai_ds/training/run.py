"""`train.py`'s body: read the three configs, check them against the data, build the DeepSpeed engine,
the strategy and the callbacks, resume if asked, and train.

The same function runs under the `deepspeed` launcher, `torchrun`, `mpirun`, `srun` and plain `python`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn

import torch

from astrai_ds.config.base import find_file
from astrai_ds.config.deepspeed import (NVME_DIR, check_nvme_offload, load_ds_config, nvme_offloads_optimizer,
                                       nvme_paths, resolve_ds_config, zero_stage)
from astrai_ds.config.model import ModelConfig
from astrai_ds.config.train import TrainConfig
from astrai_ds.data.shards import TokenShards
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import ConfigError, DataError, UserError
from astrai_ds.extensions import no_cpp_compiler, use_compile_cache, use_extensions_cache
from astrai_ds.model.transformer import shape_model
from astrai_ds.run_dir import atomic_write, tag_step
from astrai_ds.training import cpu
from astrai_ds.training.callbacks import (Checkpointer, EarlyStop, Evaluator, FrozenReferenceCheck, Logger,
                                          MetricsWriter, Progress, StopOnSignal)
from astrai_ds.training.checkpoint import (UNIVERSAL, check_resumable, find_checkpoint,
                                           remove_incomplete_checkpoints, repair_nvme_optimizer_load,
                                           repair_zero3_universal_load, to_universal)
from astrai_ds.training.data_setup import batch_iterator, build_dataset, open_data
from astrai_ds.training.distributed import (DistInfo, all_reduce_host, bf16_supported, env_rank, exit_process,
                                            init_distributed, on_accelerator)
from astrai_ds.training.engine import build_engine, build_model
from astrai_ds.training.memory import param_counts
from astrai_ds.training.guard import Launcher, find_launchers, lock_output_dir
from astrai_ds.training.metrics import Throughput, measure_peak_flops
from astrai_ds.training.strategies import STRATEGIES
from astrai_ds.training.trainer import Trainer

DEFAULT_CONFIG = "configs/train/pt_1b.json"


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a model with DeepSpeed. Launch with `deepspeed [--num_gpus N | --hostfile FILE] "
                    "train.py ...`, `torchrun --nproc_per_node N train.py ...`, `mpirun -n N python train.py ...` "
                    "or plain `python train.py ...` (one rank).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="train config (JSON or YAML); a relative path is looked up in the working directory, then "
                        "the project")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config", default="zero2.json",
                   help="DeepSpeed config (JSON, DeepSpeed's format); a bare name such as zero3.json falls back to "
                        "the project's ds_configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train-config key, e.g. --set max_steps=100 --set data.seq_len=512 "
                        "(values parse as JSON where they can)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="set by the deepspeed launcher; LOCAL_RANK in the environment is what is used")
    return p


def _load_inputs(args) -> tuple[TrainConfig, ModelConfig, Tokenizer, Path]:
    """Everything that can be checked before any process group exists, so mistakes fail fast."""
    config_path = find_file(args.config, "train config")
    cfg = TrainConfig.load(config_path, args.overrides)
    tokenizer = _load_tokenizer(cfg, config_path)
    model_cfg, model_path = _model_config(cfg, config_path, tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"{model_path}: vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size} tokens ({tokenizer.path}); set it to \"auto\" or at least "
                          f"{tokenizer.vocab_size}")
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"{config_path}: data.seq_len {cfg.data.seq_len} is above the model's max_seq_len "
                          f"{model_cfg.max_seq_len} ({model_path}); lower data.seq_len or raise max_seq_len")
    return cfg, model_cfg, tokenizer, config_path


def _model_config(cfg: TrainConfig, config_path: Path, tokenizer: Tokenizer) -> tuple[ModelConfig, Path]:
    """The model's shape: from stage.init_from's folder when fine-tuning, else from the `model` config."""
    if cfg.stage.init_from:
        from astrai_ds.model.io import read_model_config

        folder = Path(cfg.stage.init_from)
        if not (folder / "config.json").exists():
            raise ConfigError(f"{config_path}: stage.init_from {folder} is not a model folder (no config.json); "
                              f"make one with `astrai-ds export --run RUN_DIR --out {folder}`")
        model_cfg = read_model_config(folder)  # our export or a Hugging Face Llama/Qwen3 folder
        if cfg.model:
            other = ModelConfig.load(find_file(cfg.model, "model config", key=f"{config_path}: model"))
            if other.resolved(tokenizer.vocab_size).to_dict() != model_cfg.to_dict():
                raise ConfigError(f"{config_path}: model {cfg.model} differs from the shape of stage.init_from "
                                  f"{folder}; drop the 'model' key to take the shape from the folder")
        return model_cfg, folder / "config.json"
    if not cfg.model:
        raise ConfigError(f"{config_path}: set 'model' (a model config) or 'stage.init_from' (a model folder)")
    model_path = find_file(cfg.model, "model config", key=f"{config_path}: model")
    return ModelConfig.load(model_path).resolved(tokenizer.vocab_size), model_path


def _load_tokenizer(cfg: TrainConfig, config_path: Path) -> Tokenizer:
    if not Path(cfg.tokenizer).exists():
        raise DataError(f"{config_path}: tokenizer {cfg.tokenizer} does not exist; train one with "
                        f"`astrai-ds tokenizer --input YOUR_TEXT.jsonl --vocab-size 32000 --out {cfg.tokenizer}`")
    return Tokenizer.load(cfg.tokenizer)


def _write_run_files(output_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, ds_cfg: dict,
                     tokenizer: Tokenizer) -> None:
    """The resolved configs and the tokenizer travel with the run, so export needs nothing else. Each file is
    replaced atomically: another rank or a later resume never reads half of one."""
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    atomic_write(output_dir / "model_config.json", json.dumps(model_cfg.to_dict(), indent=2) + "\n")
    atomic_write(output_dir / "ds_config.json", json.dumps(ds_cfg, indent=2) + "\n")
    atomic_write(output_dir / "tokenizer.json", Path(tokenizer.path).read_bytes())
    if not tokenizer.native:  # a pretrained model's tokenizer: its special tokens, stop tokens and chat template
        from astrai_ds.model.hf import generation_config, tokenizer_config

        for name, data in (("tokenizer_config.json", tokenizer_config(tokenizer, model_cfg.max_seq_len)),
                           ("generation_config.json", generation_config(tokenizer))):
            atomic_write(output_dir / name, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _dpo_reference(cfg, model_cfg, tokenizer, ds_cfg, train_shards, dataset, collate, dist_info, device, dtype,
                   policy=None):
    """(reference callable for the strategy or None, collate) for a DPO run; see training/reference.py and
    `_live_reference`."""
    from astrai_ds.training.reference import (WithReferenceLogps, load_or_precompute, load_reference_model,
                                              precompute_reference_logps, reference_cache_path)

    dpo = cfg.dpo
    if not dpo.needs_reference:  # simpo
        return None, collate
    if dpo.reference == "live":
        return _live_reference(cfg, model_cfg, tokenizer, ds_cfg, policy, dpo.reference_offload), collate
    ref_model = load_reference_model(cfg.reference_path, model_cfg, tokenizer, cfg.reference_key)
    cache = reference_cache_path(train_shards.path, Path(cfg.reference_path), cfg.data.seq_len, dtype)
    ref_model.to(device=device, dtype=dtype)
    strategy = STRATEGIES["dpo"].from_config(dpo)
    micro = ds_cfg["train_micro_batch_size_per_gpu"]
    table = load_or_precompute(
        cache, partial(precompute_reference_logps, ref_model, dataset, collate, strategy, micro, dist_info, device),
        dist_info)
    del ref_model  # nothing of the reference stays in memory while training
    return None, WithReferenceLogps(collate, table)


def _live_reference(cfg, model_cfg, tokenizer, ds_cfg, policy, offload: bool = False):
    """The frozen reference run live (DPO's, GRPO's KL term): under LoRA without a reference folder of the stage's
    own, the policy itself with its adapters off (no second model); else a second engine from cfg.reference_path."""
    from astrai_ds.training.reference import AdaptersOff, check_reference_folder, live_reference_engine

    if cfg.lora.enabled and not cfg.reference_model:
        return AdaptersOff(policy)
    check_reference_folder(cfg.reference_path, model_cfg, tokenizer, cfg.reference_key)
    return live_reference_engine(cfg.reference_path, model_cfg, ds_cfg, offload)


@dataclass
class RunData:
    """A run's datasets (train, and eval when data.eval_path is set) with their collate functions."""

    train_shards: TokenShards
    train_set: object
    collate: object
    eval_shards: TokenShards | None = None
    eval_set: object = None
    eval_collate: object = None


@dataclass
class PromptData:
    """GRPO's data: prompt records with their answers (data.path, a JSONL file read whole) and their token ids."""

    path: Path
    records: list[dict]
    prompts: list[list[int]]
    rewards: list  # training.rewards.Reward, loaded (and so checked) before any process starts training

    @property
    def train_set(self) -> list[dict]:
        return self.records

    eval_set = None


def _open_prompt_data(cfg: TrainConfig, tokenizer: Tokenizer, config_path: Path) -> PromptData:
    """Read GRPO's prompt records and render their prompts; a prompt that leaves no room to generate in
    data.seq_len is named."""
    from astrai_ds.data.chat import render_chat
    from astrai_ds.data.prompts import prompt_messages, read_prompt_records
    from astrai_ds.training.rewards import load_rewards

    path = Path(cfg.data.path)
    if path.is_dir():
        raise DataError(f"{config_path}: data.path {path} is a folder; GRPO reads a JSONL file of prompts with their "
                        f"answers (\"messages\" or \"prompt\", and \"answer\" per line), e.g. the grpo.jsonl that "
                        f"`astrai-ds corpus` writes")
    records = read_prompt_records(path)
    prompts = [render_chat(tokenizer, prompt_messages(r), add_generation_prompt=True)[0] for r in records]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) >= cfg.data.seq_len:
        raise DataError(f"{path} record {longest + 1}: its prompt is {len(prompts[longest])} tokens, which leaves no "
                        f"room to generate within data.seq_len {cfg.data.seq_len}; raise data.seq_len (to the prompt "
                        f"plus grpo.max_new_tokens {cfg.grpo.max_new_tokens}) or shorten the prompt")
    return PromptData(path, records, prompts, load_rewards(cfg.grpo.rewards))


def _open_run_data(cfg: TrainConfig, tokenizer: Tokenizer, config_path: Path) -> RunData | PromptData:
    if cfg.stage.type == "grpo":
        return _open_prompt_data(cfg, tokenizer, config_path)
    train_shards = open_data(cfg.data.path, "data.path", cfg, tokenizer, config_path)
    data = RunData(train_shards, *build_dataset(train_shards, cfg))
    if cfg.data.eval_path:
        data.eval_shards = open_data(cfg.data.eval_path, "data.eval_path", cfg, tokenizer, config_path)
        data.eval_set, data.eval_collate = build_dataset(data.eval_shards, cfg)
    return data


def _setup_cpu(cfg: TrainConfig) -> list[str]:
    """CPU-only settings (see training/cpu.py); returns what was switched on, for the start-up line."""
    if on_accelerator():
        return []
    shm = cfg.cpu.collectives == "auto" and cpu.install_shm_collectives()
    kept = cfg.cpu.keep_freed_memory and cpu.keep_freed_memory()
    return ["collectives: shared memory + gloo"] * bool(shm) + ["malloc keeps freed memory"] * bool(kept)


def _prepare_output_dir(cfg: TrainConfig, model_cfg: ModelConfig, ds_cfg: dict, tokenizer: Tokenizer,
                        dist_info: DistInfo):
    """Find the checkpoint to resume from and check that it can resume here, before anything is written;
    then (rank 0) clear what a killed run left half-written and write the run files. -> (load_dir, tag, universal)
    or None; universal: the checkpoint was converted to DeepSpeed's universal format, to load on this number of
    ranks."""
    output_dir = Path(cfg.output_dir)
    # Every rank reads the folder before rank 0 changes anything in it.
    resume = find_checkpoint(cfg.resume, output_dir)
    universal = False
    if resume:
        load_dir, tag, notes = resume
        universal = check_resumable(load_dir, tag, dist_info.world_size, zero_stage(ds_cfg), model_cfg.to_dict(),
                                    cfg.parallel.pipeline_stages, nvme=nvme_offloads_optimizer(ds_cfg),
                                    optimizer=cfg.optimizer.type)
    torch.distributed.barrier()
    if dist_info.is_main:
        for note in resume[2] if resume else []:
            print(f"resume: {note}", flush=True)
        for name in remove_incomplete_checkpoints(output_dir) if output_dir.exists() else []:
            print(f"removed {output_dir / name}: an incomplete checkpoint left by an interrupted run", flush=True)
        _write_run_files(output_dir, cfg, model_cfg, ds_cfg, tokenizer)
    if universal:  # written by another number of ranks: rank 0 converts it, every rank loads the conversion
        if dist_info.is_main:
            for note in to_universal(load_dir, tag, output_dir)[1]:
                print(f"resume: {note}", flush=True)
        torch.distributed.barrier()
        return output_dir / UNIVERSAL, tag, True
    torch.distributed.barrier()
    return (load_dir, tag, False) if resume else None


def _build_engine_and_strategy(cfg, model_cfg, tokenizer, ds_cfg, data: RunData, dist_info: DistInfo, dtype):
    """The DeepSpeed engine (and, for DPO, the reference) and the stage's strategy -> (engine, strategy, number of
    parameters)."""
    if cfg.parallel.pipeline_stages > 1:
        from astrai_ds.training.pipeline import build_pipeline_model

        model = build_pipeline_model(model_cfg, cfg.parallel, cfg.seed, cfg.stage.init_from,
                                     cfg.activation_checkpointing)
    else:
        model = build_model(model_cfg, ds_cfg, cfg.seed, cfg.stage.init_from, cfg.activation_checkpointing)
    if cfg.lora.enabled:
        from astrai_ds.model.lora import apply_lora

        lora = cfg.lora
        apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target)  # A: the seeded RNG, the same on all ranks
    n_params = param_counts(model_cfg).total  # counted from the shapes: under ZeRO-3 no rank holds them all
    engine = build_engine(model, cfg, ds_cfg)
    reference = None
    if cfg.stage.type == "dpo":
        reference, data.collate = _dpo_reference(cfg, model_cfg, tokenizer, ds_cfg, data.train_shards,
                                                 data.train_set, data.collate, dist_info, engine.device, dtype,
                                                 policy=engine.module)
        if data.eval_set is not None and cfg.dpo.reference == "precomputed":  # the eval pairs need their own table
            _, data.eval_collate = _dpo_reference(cfg, model_cfg, tokenizer, ds_cfg, data.eval_shards, data.eval_set,
                                                  data.eval_collate, dist_info, engine.device, dtype)
    elif cfg.stage.type == "grpo" and cfg.grpo.beta > 0:
        reference = _live_reference(cfg, model_cfg, tokenizer, ds_cfg, engine.module)
    strategy = STRATEGIES[cfg.stage.type].from_config(cfg.grpo if cfg.stage.type == "grpo" else cfg.dpo,
                                                      reference=reference)
    strategy.fused = cfg.fused_loss and cfg.parallel.pipeline_stages == 1
    if cfg.compile:
        _compile(engine, dist_info)
    return engine, strategy, n_params


def _compile(engine, dist_info: DistInfo) -> None:
    """DeepSpeed's engine.compile() (torch.compile of the whole model, inductor), lazily: the first forward compiles.
    A CPU without a C++ compiler (which inductor's CPU code needs) trains eager and says so in one line."""
    cache = use_compile_cache()
    if engine.device.type == "cpu" and (line := no_cpp_compiler("training runs eager", "set compile false")):
        if dist_info.is_main:
            print(line, flush=True)
        return
    # RoPE's tables are built on first use and cached per device: built inside the first compiled forward, the
    # cache's guard would fail on the next call and the first graph (eval's or training's) would compile twice.
    engine.module.rope.tables(engine.device)
    engine.compile()
    if dist_info.is_main:
        print(f"compile: torch.compile (inductor) compiles the model in the first step; its kernels are cached in "
              f"{cache}", flush=True)


def _measure_peak(engine, dtype) -> float:
    """The summed matmul peak of all ranks; all measure at once, as they share the machine while training."""
    torch.distributed.barrier()
    peak = torch.tensor([measure_peak_flops(engine.device, dtype)], dtype=torch.float64)
    return all_reduce_host(peak).item()


def _add_callbacks(trainer: Trainer, cfg: TrainConfig, data: RunData, resume_step: int | None, peak: float,
                   launchers: tuple[Launcher, ...]) -> None:
    output_dir, is_main = Path(cfg.output_dir), trainer.dist.is_main
    writer = MetricsWriter(output_dir, enabled=is_main, resume_step=resume_step)
    logger = Logger(writer, cfg.log_interval, Throughput(peak))
    if data.eval_set is not None:
        trainer.add_callbacks(Evaluator(writer, cfg.eval_interval))
        if cfg.early_stop.patience > 0:
            trainer.add_callbacks(EarlyStop(cfg.early_stop.patience, cfg.early_stop.min_delta))
    if trainer.strategy.reference_forward:
        trainer.add_callbacks(FrozenReferenceCheck(trainer.strategy.reference))
    trainer.add_callbacks(logger, Progress(is_main, logger), StopOnSignal(launchers),
                          Checkpointer(output_dir, cfg.save_interval, cfg.keep_checkpoints))


def build_trainer(args) -> Trainer:
    # First: once a launcher dies, its ranks get another parent and could not find it any more.
    launchers = find_launchers()
    cfg, model_cfg, tokenizer, config_path = _load_inputs(args)
    data = _open_run_data(cfg, tokenizer, config_path)
    ds_raw, ds_path = load_ds_config(args.ds_config)

    dist_info = init_distributed()
    # The DeepSpeed config is checked against the train config before the run folder is touched: a mistake in
    # either leaves nothing behind (not even the folder and its lock file).
    ds_cfg = resolve_ds_config(ds_raw, cfg, dist_info.world_size, bf16_supported=bf16_supported(),
                               accelerator=on_accelerator(), source=str(ds_path), train_source=str(config_path))
    check_nvme_offload(ds_cfg, str(ds_path))
    if cfg.stage.type == "grpo":
        _check_grpo_batch(cfg, ds_cfg)
    # Before anything reads or writes in output_dir: a second run into it stops here, naming the first.
    run_lock = lock_output_dir(Path(cfg.output_dir), dist_info)
    cpu_notes = _setup_cpu(cfg)
    dtype = torch.bfloat16 if ds_cfg["bf16"]["enabled"] else torch.float32
    resume = _prepare_output_dir(cfg, model_cfg, ds_cfg, tokenizer, dist_info)
    if resume and resume[2]:  # for this engine only: the run's ds_config.json stays as the user wrote it
        ds_cfg = {**ds_cfg, "checkpoint": {**ds_cfg.get("checkpoint", {}), "load_universal": True}}

    engine, strategy, n_params = _build_engine_and_strategy(cfg, model_cfg, tokenizer, ds_cfg, data, dist_info, dtype)
    micro = ds_cfg["train_micro_batch_size_per_gpu"]
    # The data is split over the data-parallel replicas; every pipeline stage of a replica reads the same batches.
    replica = (engine.grid.data_parallel_id, engine.dp_world_size) if cfg.parallel.pipeline_stages > 1 else \
        (dist_info.rank, dist_info.world_size)
    if cfg.stage.type == "grpo":
        train_batches = _rollout_batches(cfg, model_cfg, tokenizer, ds_cfg, data, engine, strategy, dist_info, dtype)
    else:
        train_batches = batch_iterator(data.train_set, data.collate, micro, replica, cfg.seed, cfg.data.shuffle,
                                       engine.device)
    trainer = Trainer(engine, strategy, train_batches,
                      batch_iterator(data.eval_set, data.eval_collate, micro, replica, cfg.seed, False, engine.device)
                      if data.eval_set is not None else None,
                      cfg, dist_info)
    trainer.flops_per_token = shape_model(model_cfg).flops_per_token
    peak = _measure_peak(engine, dtype)
    _add_callbacks(trainer, cfg, data, tag_step(resume[1]) if resume else None, peak, launchers)
    trainer.run_lock = run_lock  # held as long as the trainer lives (the process, for train.py)
    # NVMe offload's swap files in the run folder: only the running engine reads them (checkpoints hold the states).
    trainer.swap_dirs = [p for p in nvme_paths(ds_cfg) if p == Path(cfg.output_dir) / NVME_DIR]

    if resume:
        # A LoRA run's checkpoints hold the adapters alone: the frozen base comes from stage.init_from (or the seed)
        _, client_state = engine.load_checkpoint(str(resume[0]), tag=resume[1], load_module_strict=not cfg.lora.enabled)
        if resume[2] and zero_stage(ds_cfg) == 3:
            repair_zero3_universal_load(engine, resume[0], resume[1])
        if nvme_offloads_optimizer(ds_cfg):
            repair_nvme_optimizer_load(engine, resume[0], resume[1])
        trainer.load_state_dict(client_state)
        trainer.log(f"resumed from {resume[0] / resume[1]} at step {trainer.state.step}")
    _log_start(trainer, cfg, ds_cfg, data, n_params, peak, dtype, cpu_notes)
    return trainer


def _check_grpo_batch(cfg, ds_cfg) -> None:
    """Each rank's completions of a step must be whole groups (its advantages compare a group's completions)."""
    micro, accum = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
    group = cfg.grpo.group_size
    if (micro * accum) % group:
        raise ConfigError(f"micro_batch_size {micro} x grad_accum_steps {accum} = {micro * accum} completions per rank "
                          f"and step is not a whole number of groups of grpo.group_size {group}: make it a multiple "
                          f"of {group} (micro_batch_size counts completions)")


def _rollout_batches(cfg, model_cfg, tokenizer, ds_cfg, data: PromptData, engine, strategy, dist_info, dtype):
    """GRPO's train batches: rollouts of whole groups on every rank (training/rollout.py)."""
    from astrai_ds.training.rollout import RolloutBatches

    micro, accum = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
    return RolloutBatches(engine, model_cfg, tokenizer, data.records, data.prompts, cfg, micro, accum, dist_info,
                          data.rewards, str(data.path), reference=strategy.reference, dtype=dtype)


def _trained(engine) -> int:
    """Parameters the optimizer updates, counted from their shapes (under ZeRO-3 a rank holds a shard)."""
    import math

    return sum(math.prod(getattr(p, "ds_shape", p.shape)) for p in engine.module.parameters() if p.requires_grad)


def _log_start(trainer, cfg, ds_cfg, data: RunData, n_params, peak, dtype, cpu_notes) -> None:
    if cfg.stage.type == "sft":
        train_set = data.train_set
        trainer.log(f"sft data: {train_set.num_conversations} conversations in {len(train_set)} "
                    f"{'packed ' if cfg.data.packing else ''}sequences; longer than seq_len {cfg.data.seq_len}: "
                    f"{train_set.num_truncated} truncated, {train_set.num_dropped} dropped (data.overlong)")
    world = trainer.dist.world_size
    trainer.log(
        f"stage {cfg.stage.type} | model {n_params / 1e6:.2f}M params | world {world} | "
        f"ZeRO-{zero_stage(ds_cfg)} | {'bf16' if dtype == torch.bfloat16 else 'fp32'} | "
        + "".join(f"{note} | " for note in cpu_notes)
        + (f"{trainer.stages} pipeline stages | " if trainer.stages > 1 else "")
        + (f"LoRA r {cfg.lora.r} on {', '.join(cfg.lora.target)}: {_trained(trainer.engine) / 1e6:.3f}M params "
           f"trained, the rest frozen | " if cfg.lora.enabled else "")
        + f"micro {ds_cfg['train_micro_batch_size_per_gpu']} x accum {ds_cfg['gradient_accumulation_steps']} x dp "
        f"{trainer.engine.dp_world_size} = {ds_cfg['train_batch_size']} samples of up to {cfg.data.seq_len} tokens | "
        f"{len(data.train_set)} train samples | peak {peak / 1e9:.0f} GFLOP/s (measured: {dtype} matmul on "
        f"{trainer.engine.device.type}, all ranks) | {trainer.flops_per_token(cfg.data.seq_len) / 1e6:.1f} "
        "MFLOP/token at full length (6N + 12LdT)")


def main_and_exit(argv: list[str] | None = None, prog: str = "train.py") -> NoReturn:
    """`main()` for a process of its own (train.py, `astrai-ds train`): ends the process with main's exit code
    through `exit_process` once it returns."""
    exit_process(main(argv, prog))


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    args = build_parser(prog).parse_args(argv)
    use_extensions_cache()  # DeepSpeed's compiled ops: built once per machine, whatever the checkout
    use_compile_cache()  # and torch.compile's kernels (before anything asks inductor for its cache folder)
    # DeepSpeed calls torch.distributed's old collective names on every step; torch warns each time.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.",
                            category=FutureWarning)
    # DeepSpeed's pipeline engine sends activations between stages with broadcasts, which gloo's autograd fallback
    # warns about on every backward; the gradients are sent explicitly and are exact (tests/training/test_pipeline.py).
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered",
                            category=UserWarning)
    try:
        trainer = build_trainer(args)
        state = trainer.fit()
        trainer.log(f"done: step {state.step}, {state.tokens_seen} tokens, output in {trainer.cfg.output_dir}")
        # No rank tears its process group down while another still has collectives in flight: the peer's
        # gloo threads then fail on the closed socket and abort the process after a successful run.
        torch.distributed.barrier()
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # the swap folder may be on each node's own disk
            for swap in trainer.swap_dirs:
                shutil.rmtree(swap, ignore_errors=True)
        stop = next(cb for cb in trainer.callbacks if cb.name == "StopOnSignal")
        if stop.exit_code == 130 and env_rank() == 0:
            print("interrupted: run the same command again to resume from the last complete checkpoint",
                  file=sys.stderr, flush=True)
        return stop.exit_code
    except UserError as e:
        if env_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the terminal sends SIGINT to every rank of the launch
        if env_rank() == 0:
            print("interrupted: run the same command again to resume from the last complete checkpoint",
                  file=sys.stderr, flush=True)
        return 130
    finally:
        # Tear the process group down before interpreter exit: left to the exit handlers, gloo's threads
        # can be destroyed while still joinable, and the rank aborts ("terminate called without an active
        # exception") after a successful run.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
