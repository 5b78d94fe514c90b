"""A model folder and a run folder of a randomly initialised 2-layer model on the workspace's tokenizer,
written directly (no training), for the commands that read them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.model import ModelConfig, Transformer
from astrai_ds.model.io import save_model_folder
from astrai_ds.run_dir import LATEST, write_marker


def _tiny_model(workspace) -> Transformer:
    torch.manual_seed(0)
    vocab = Tokenizer.load(workspace / "tokenizer").vocab_size
    return Transformer(ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                                   max_seq_len=128))


@pytest.fixture(scope="session")
def model_dir(workspace, tmp_path_factory):
    """A model folder as `astrai-ds export` writes it: what `astrai-ds eval` reads."""
    out = tmp_path_factory.mktemp("model")
    return save_model_folder(_tiny_model(workspace), Tokenizer.load(workspace / "tokenizer"), out)


@pytest.fixture(scope="session")
def run_dir(workspace, tmp_path_factory):
    """A run folder as train.py leaves it after one save without ZeRO: what `astrai-ds export` reads."""
    run = tmp_path_factory.mktemp("run")
    model = _tiny_model(workspace)
    (run / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    (run / "ds_config.json").write_text("{}")
    shutil.copyfile(workspace / "tokenizer" / "tokenizer.json", run / "tokenizer.json")
    checkpoint = run / "global_step1"
    checkpoint.mkdir()
    torch.save({"module": model.state_dict()}, checkpoint / "mp_rank_00_model_states.pt")
    write_marker(checkpoint, step=1, world_size=1, zero_stage=0)
    (run / LATEST).write_text(checkpoint.name)
    return run
