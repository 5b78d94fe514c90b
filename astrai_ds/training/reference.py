"""The frozen reference model of DPO, in its two forms.

- live: a second DeepSpeed engine without optimizer (ZeRO-3 sharded when the policy is, optionally with
  its parameters in host memory), run in eval mode on every step's concatenated batch;
- precomputed: one pass over the data before training writes every pair's reference log-probs beside
  the prepared data, keyed by the reference model's and the data's hashes, so later runs reuse them and
  no reference model is held in memory while training.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from astrai_ds.config.deepspeed import zero_stage
from astrai_ds.config.model import ModelConfig
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import ConfigError
from astrai_ds.training.distributed import DistInfo


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_reference_folder(model_dir: str | Path, policy_cfg: ModelConfig, tokenizer: Tokenizer, key: str) -> None:
    """The reference model's folder must exist and hold the policy's shape and vocabulary."""
    from astrai_ds.model.io import read_model_config

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ConfigError(f"{key} {model_dir} is not a model folder (no config.json); make one with "
                          f"`astrai-ds export --run RUN_DIR --out {model_dir}`")
    ref_cfg = read_model_config(model_dir).to_dict()
    diffs = [f"{k} {v} vs the policy's {policy_cfg.to_dict()[k]}" for k, v in ref_cfg.items()
             if policy_cfg.to_dict()[k] != v]
    if diffs:
        raise ConfigError(f"{key} {model_dir}: the reference model's shape differs from the policy's "
                          f"({', '.join(diffs)}); use the folder the policy was initialised from")
    if Tokenizer.load(model_dir / "tokenizer.json").hash != tokenizer.hash:
        raise ConfigError(f"{key} {model_dir}: the reference model uses another tokenizer (vocabulary) than this run "
                          f"({tokenizer.path}); DPO compares log-probs token by token, so both must be the same")


def load_reference_model(model_dir: str | Path, policy_cfg: ModelConfig, tokenizer: Tokenizer, key: str):
    """The reference model from an exported folder, whole on this rank and frozen (to precompute log-probs)."""
    from astrai_ds.model.io import load_model_folder

    check_reference_folder(model_dir, policy_cfg, tokenizer, key)
    model, _ = load_model_folder(model_dir)
    model.requires_grad_(False)
    return model.eval()


def live_reference_engine(model_dir: str | Path, policy_cfg: ModelConfig, policy_ds: dict, offload: bool):
    """A DeepSpeed engine for inference only: no optimizer, no gradients, ZeRO-3 if the policy uses it (the
    reference is then built sharded, under `zero.Init`, as the policy is)."""
    import deepspeed

    from astrai_ds.training.engine import build_model

    zero = {"stage": 3 if zero_stage(policy_ds) == 3 else 0}
    if offload and zero["stage"] == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {key: policy_ds[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                              "train_batch_size", "bf16", "fp16")}
    config.update(zero_optimization=zero, steps_per_print=2**31 - 1)
    model = build_model(policy_cfg, config, seed=0, init_from=model_dir)
    model.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model.eval(), config=config)
    engine.eval()
    return engine


class AdaptersOff:
    """DPO's reference under LoRA: the policy's own model with its adapters switched off, which is the frozen base
    it started from (input_ids (N, T) -> logits (N, T, V), called without gradients)."""

    frozen_only = True  # what must stay unchanged: the base weights (the adapters train)

    def __init__(self, model: torch.nn.Module):
        self.module = model

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        from astrai_ds.model.lora import adapters_enabled

        with adapters_enabled(self.module, False):
            return self.module(input_ids)


def parameter_checksum(module: torch.nn.Module, frozen_only: bool = False) -> str:
    """A hash of this rank's share of the parameters (ZeRO-3 keeps each rank's partition in `ds_tensor`); with
    `frozen_only`, of those that take no gradient."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        if frozen_only and p.requires_grad:
            continue
        t = getattr(p, "ds_tensor", p.data).detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def reference_cache_path(data_dir: Path, model_dir: Path, seq_len: int, dtype: torch.dtype) -> Path:
    weights = Path(model_dir) / "model.safetensors"
    if weights.exists():
        model_hash = file_sha256(weights)[:16]
    else:  # a Hugging Face folder with sharded weights
        shards = sorted(Path(model_dir).glob("model-*.safetensors"))
        model_hash = hashlib.sha256("".join(file_sha256(p) for p in shards).encode()).hexdigest()[:16]
    data_hash = file_sha256(Path(data_dir) / "index.json")[:16]
    return Path(data_dir) / f"ref_logps_{model_hash}_{data_hash}_{seq_len}_{str(dtype).split('.')[-1]}.npy"


@torch.no_grad()
def precompute_reference_logps(model: torch.nn.Module, dataset, collate, strategy, micro: int,
                               dist_info: DistInfo, device: torch.device) -> np.ndarray:
    """(num_pairs, 2) float32: the reference's summed log-probs of every pair's chosen and rejected response.
    Ranks split the pairs, then gather them, so every rank returns the whole table."""
    from tqdm import tqdm

    mine = list(range(dist_info.rank, len(dataset), dist_info.world_size))
    rows = []
    for start in tqdm(range(0, len(mine), micro), desc="reference log-probs", disable=not dist_info.is_main):
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in mine[start:start + micro]]).items()}
        chosen, rejected = strategy.reference_logps(model, batch)
        rows.append(torch.stack([batch["index"].double(), chosen.double(), rejected.double()], 1).cpu())
    local = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
    gathered = [None] * dist_info.world_size
    dist.all_gather_object(gathered, local)
    table = np.full((len(dataset), 2), np.nan, dtype=np.float32)
    for part in gathered:
        table[part[:, 0].long().numpy()] = part[:, 1:].numpy()
    assert not np.isnan(table).any(), "every pair must have reference log-probs"
    return table


def load_or_precompute(cache: Path, compute, dist_info: DistInfo) -> np.ndarray:
    """Reuse the cached table if it is there; otherwise compute it on every rank and let rank 0 save it."""
    if cache.exists():
        if dist_info.is_main:
            print(f"reference log-probs: reusing {cache}", flush=True)
        return np.load(cache)
    table = compute()
    if dist_info.is_main:
        tmp = cache.with_name(f".{cache.name}.tmp.npy")
        np.save(tmp, table)
        os.replace(tmp, cache)
        print(f"reference log-probs: computed {len(table)} pairs, saved to {cache}", flush=True)
    dist.barrier()
    return table


class WithReferenceLogps:
    """Collate wrapper that adds each pair's precomputed reference log-probs to a DPO batch."""

    def __init__(self, collate, table: np.ndarray):
        self.collate, self.table = collate, torch.from_numpy(table)

    def __call__(self, items) -> dict:
        batch = self.collate(items)
        ref = self.table[batch["index"]]  # (B, 2)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:, 0], ref[:, 1]
        return batch
