"""`train.py`'s body: read the three configs, check them against the data, build the DeepSpeed engine,
the strategy and the callbacks, resume if asked, and train.

The same function runs under the `deepspeed` launcher, `torchrun`, `mpirun`, `srun` and plain `python`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import torch

from astrai_ds.config.base import find_file
from astrai_ds.config.deepspeed import load_ds_config, resolve_ds_config, zero_stage
from astrai_ds.config.model import ModelConfig
from astrai_ds.config.train import TrainConfig
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import ConfigError, DataError, UserError
from astrai_ds.training import cpu
from astrai_ds.training.callbacks import (Checkpointer, EarlyStop, Evaluator, FrozenReferenceCheck, Logger,
                                          MetricsWriter, Progress, StopOnSignal)
from astrai_ds.training.checkpoint import find_checkpoint
from astrai_ds.training.data_setup import batch_iterator, build_dataset, open_data
from astrai_ds.training.distributed import (all_reduce_host, bf16_supported, env_rank, exit_process, init_distributed,
                                            on_accelerator)
from astrai_ds.training.engine import build_engine
from astrai_ds.training.metrics import Throughput, measure_peak_flops
from astrai_ds.training.strategies import STRATEGIES
from astrai_ds.training.trainer import Trainer

DEFAULT_CONFIG = "configs/train/pt_1b.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train a model with DeepSpeed. Launch with `deepspeed [--num_gpus N | --hostfile FILE] "
                    "train.py ...`, `torchrun --nproc_per_node N train.py ...`, `mpirun -n N python train.py ...` "
                    "or plain `python train.py ...` (one rank).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="train config (JSON); a relative path is looked up in the working directory, then the project")
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
        folder = Path(cfg.stage.init_from)
        if not (folder / "config.json").exists():
            raise ConfigError(f"{config_path}: stage.init_from {folder} is not a model folder (no config.json); "
                              f"make one with `astrai-ds export --run RUN_DIR --out {folder}`")
        model_cfg = ModelConfig.load(folder / "config.json")
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
    """The resolved configs and the tokenizer travel with the run, so export needs nothing else."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (output_dir / "model_config.json").write_text(json.dumps(model_cfg.to_dict(), indent=2) + "\n")
    (output_dir / "ds_config.json").write_text(json.dumps(ds_cfg, indent=2) + "\n")
    shutil.copyfile(tokenizer.path, output_dir / "tokenizer.json")


def _build_model(cfg: TrainConfig, model_cfg: ModelConfig):
    from astrai_ds.convert.export import load_weights
    from astrai_ds.model import Transformer

    torch.manual_seed(cfg.seed)  # the same init on every rank and for every ZeRO stage
    model = Transformer(model_cfg)
    if cfg.stage.init_from:
        load_weights(model, cfg.stage.init_from)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model


def _dpo_reference(cfg, model_cfg, tokenizer, ds_cfg, train_shards, dataset, collate, dist_info, device, dtype):
    """(reference callable for the strategy or None, collate) for a DPO run; see training/reference.py."""
    from astrai_ds.training.reference import (WithReferenceLogps, live_reference_engine, load_or_precompute,
                                              load_reference_model, precompute_reference_logps,
                                              reference_cache_path)

    stage = cfg.stage
    if stage.loss_type == "simpo":  # reference-free
        return None, collate
    ref_model = load_reference_model(stage.reference_path, model_cfg, tokenizer, "stage.reference_model")
    if stage.reference == "live":
        return live_reference_engine(ref_model, ds_cfg, stage.reference_offload), collate
    cache = reference_cache_path(train_shards.path, Path(stage.reference_path), cfg.data.seq_len, dtype)
    ref_model.to(device=device, dtype=dtype)
    strategy = STRATEGIES["dpo"].from_config(stage)
    micro = ds_cfg["train_micro_batch_size_per_gpu"]
    table = load_or_precompute(
        cache, lambda: precompute_reference_logps(ref_model, dataset, collate, strategy, micro, dist_info, device),
        dist_info)
    del ref_model  # nothing of the reference stays in memory while training
    return None, WithReferenceLogps(collate, table)


def build_trainer(args) -> Trainer:
    cfg, model_cfg, tokenizer, config_path = _load_inputs(args)
    train_shards = open_data(cfg.data.path, "data.path", cfg, tokenizer, config_path)
    eval_shards = open_data(cfg.data.eval_path, "data.eval_path", cfg, tokenizer, config_path) \
        if cfg.data.eval_path else None
    train_set, collate = build_dataset(train_shards, cfg)
    eval_set, eval_collate = build_dataset(eval_shards, cfg) if eval_shards else (None, None)
    ds_raw, ds_path = load_ds_config(args.ds_config)

    dist_info = init_distributed()
    on_cpu = not on_accelerator()
    shm = on_cpu and cfg.cpu.collectives == "auto" and cpu.install_shm_collectives()
    kept = on_cpu and cfg.cpu.keep_freed_memory and cpu.keep_freed_memory()
    ds_cfg = resolve_ds_config(ds_raw, cfg, dist_info.world_size, bf16_supported=bf16_supported(),
                               accelerator=not on_cpu, source=str(ds_path))
    dtype = torch.bfloat16 if ds_cfg["bf16"]["enabled"] else torch.float32
    output_dir = Path(cfg.output_dir)
    resume = find_checkpoint(cfg.resume, output_dir)
    if resume:
        _check_same_model(resume[0], model_cfg)
    if dist_info.is_main:
        _write_run_files(output_dir, cfg, model_cfg, ds_cfg, tokenizer)

    model = _build_model(cfg, model_cfg)
    n_params = model.num_params()  # before ZeRO-3 partitions the parameters
    engine = build_engine(model, cfg, ds_cfg)
    reference = None
    if cfg.stage.type == "dpo":
        reference, collate = _dpo_reference(cfg, model_cfg, tokenizer, ds_cfg, train_shards, train_set, collate,
                                            dist_info, engine.device, dtype)
        if eval_set is not None and cfg.stage.reference == "precomputed":  # the eval pairs need their own table
            _, eval_collate = _dpo_reference(cfg, model_cfg, tokenizer, ds_cfg, eval_shards, eval_set,
                                             eval_collate, dist_info, engine.device, dtype)

    micro = ds_cfg["train_micro_batch_size_per_gpu"]
    strategy = STRATEGIES[cfg.stage.type].from_config(cfg.stage, reference=reference)
    trainer = Trainer(engine, strategy,
                      batch_iterator(train_set, collate, micro, dist_info, cfg.seed, cfg.data.shuffle, engine.device),
                      batch_iterator(eval_set, eval_collate, micro, dist_info, cfg.seed, False, engine.device)
                      if eval_set is not None else None,
                      cfg, dist_info)

    torch.distributed.barrier()  # all ranks measure at once: they share the machine while training too
    peak = torch.tensor([measure_peak_flops(engine.device, dtype)], dtype=torch.float64)
    all_reduce_host(peak)
    flops_per_token = model.flops_per_token(cfg.data.seq_len)

    writer = MetricsWriter(output_dir, enabled=dist_info.is_main)
    logger = Logger(writer, cfg.log_interval, Throughput(flops_per_token, peak.item()))
    if eval_set is not None:
        trainer.callbacks.append(Evaluator(writer, cfg.eval_interval))
        if cfg.early_stop.patience > 0:
            trainer.callbacks.append(EarlyStop(cfg.early_stop.patience, cfg.early_stop.min_delta))
    if reference is not None:
        trainer.callbacks.append(FrozenReferenceCheck(reference))
    trainer.callbacks += [logger, Progress(dist_info.is_main, logger), StopOnSignal(),
                          Checkpointer(output_dir, cfg.save_interval, cfg.keep_checkpoints)]

    if resume:
        _, client_state = engine.load_checkpoint(str(resume[0]), tag=resume[1])
        trainer.load_state_dict(client_state)
        trainer.log(f"resumed from {resume[0] / resume[1]} at step {trainer.state.step}")

    if cfg.stage.type == "sft":
        trainer.log(f"sft data: {train_set.num_conversations} conversations in {len(train_set)} "
                    f"{'packed ' if cfg.data.packing else ''}sequences; longer than seq_len {cfg.data.seq_len}: "
                    f"{train_set.num_truncated} truncated, {train_set.num_dropped} dropped (data.overlong)")
    trainer.log(
        f"stage {cfg.stage.type} | model {n_params / 1e6:.2f}M params | world {dist_info.world_size} | "
        f"ZeRO-{zero_stage(ds_cfg)} | {'bf16' if dtype == torch.bfloat16 else 'fp32'} | "
        f"{'collectives: shared memory + gloo | ' if shm else ''}{'malloc keeps freed memory | ' if kept else ''}"
        f"micro {micro} x accum "
        f"{ds_cfg['gradient_accumulation_steps']} x dp {dist_info.world_size} = {ds_cfg['train_batch_size']} samples "
        f"of {cfg.data.seq_len} tokens | {len(train_set)} train samples | peak {peak.item() / 1e9:.0f} GFLOP/s "
        f"(measured: {dtype} matmul on {engine.device.type}, all ranks) | {flops_per_token / 1e6:.1f} MFLOP/token "
        f"(6N + 12LdT)")
    return trainer


def _check_same_model(load_dir: Path, model_cfg: ModelConfig) -> None:
    saved = load_dir / "model_config.json"
    if saved.exists() and json.loads(saved.read_text()) != model_cfg.to_dict():
        raise ConfigError(f"cannot resume from {load_dir}: it was trained with the model config in {saved}, which "
                          f"differs from this run's; use the same model config, another output_dir, or resume \"none\"")


def main_and_exit(argv: list[str] | None = None) -> NoReturn:
    """`main()` for a process of its own (train.py, `astrai-ds train`): ends the process with main's exit code
    through `exit_process` once it returns."""
    exit_process(main(argv))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # DeepSpeed calls torch.distributed's old collective names on every step; torch warns each time.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.",
                            category=FutureWarning)
    try:
        trainer = build_trainer(args)
        state = trainer.fit()
        trainer.log(f"done: step {state.step}, {state.tokens_seen} tokens, output in {trainer.cfg.output_dir}")
        # No rank tears its process group down while another still has collectives in flight: the peer's
        # gloo threads then fail on the closed socket and abort the process after a successful run.
        torch.distributed.barrier()
        return 0
    except UserError as e:
        if env_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        # Tear the process group down before interpreter exit: left to the exit handlers, gloo's threads
        # can be destroyed while still joinable, and the rank aborts ("terminate called without an active
        # exception") after a successful run.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
