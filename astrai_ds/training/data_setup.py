"""Open a run's prepared data and turn it into per-rank micro-batches, for whichever stage the run trains."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from astrai_ds.config.train import TrainConfig
from astrai_ds.data.sampler import DistributedBatchSampler
from astrai_ds.data.shards import TokenShards
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import DataError
from astrai_ds.training.batches import BatchIterator

_INPUT_HINT = {"pt": "YOUR_TEXT.jsonl", "sft": "YOUR_CHATS.jsonl", "dpo": "YOUR_PAIRS.jsonl"}


def open_data(path: str, key: str, cfg: TrainConfig, tokenizer: Tokenizer, config_path: Path) -> TokenShards:
    """Open prepared shards and check they were made for this run's stage and with its tokenizer."""
    stage = cfg.stage.type
    prepare = (f"astrai-ds prepare --stage {stage} --input {_INPUT_HINT[stage]} --tokenizer {cfg.tokenizer} "
               f"--seq-len {cfg.data.seq_len} --out")
    if not (Path(path) / "index.json").exists():
        raise DataError(f"{config_path}: {key} {path} holds no prepared data (no index.json). Make it with:\n"
                        f"  {prepare} {path}")
    shards = TokenShards(path)
    made_for = shards.meta.get("stage", "pt")
    if made_for != stage:
        new = f"{Path(path)}_{stage}"  # a new folder: preparing into `path` itself would replace its data
        raise DataError(f"{config_path}: {key} {path} was prepared for stage '{made_for}', but this run trains "
                        f"stage '{stage}' (stage.type); make {stage} data in a new folder with `{prepare} {new}` "
                        f"and set {key} to {new}")
    if shards.meta.get("tokenizer_hash") != tokenizer.hash:
        raise DataError(f"{config_path}: {key} {path} was prepared with a different tokenizer than {tokenizer.path} "
                        f"(hash {str(shards.meta.get('tokenizer_hash'))[:12]} vs {tokenizer.hash[:12]}); make it "
                        f"again with `{prepare} {path} --overwrite` (this replaces the data in {path})")
    return shards


def build_dataset(shards: TokenShards, cfg: TrainConfig):
    """(dataset, collate) for the run's stage."""
    from astrai_ds.data import datasets

    stage, seq_len = cfg.stage.type, cfg.data.seq_len
    if stage == "pt":
        return datasets.PretrainDataset(shards, seq_len), datasets.collate_pretrain
    if stage == "sft":
        dataset = datasets.SFTDataset(shards, seq_len, packing=cfg.data.packing, overlong=cfg.data.overlong)
        return dataset, partial(datasets.collate_sft, seq_len=seq_len)
    return datasets.DPODataset(shards, seq_len), datasets.collate_dpo


def batch_iterator(dataset, collate, micro: int, replica: tuple[int, int], seed: int, shuffle: bool,
                   device: torch.device) -> BatchIterator:
    """Micro-batches for data-parallel replica `replica` = (index, count): the ranks, or with pipeline stages the
    replicas, each of which spans the stages."""
    index, count = replica
    if not shuffle:  # evaluation: a small held-out set may not fill a training-sized micro-batch on every rank
        micro = max(1, min(micro, len(dataset) // count))
    sampler = DistributedBatchSampler(len(dataset), micro, index, count, seed, shuffle=shuffle)
    return BatchIterator(dataset, sampler, collate, device)
