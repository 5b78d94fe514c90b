"""A run folder of the randomly initialised 2-layer test model (tests/conftest.py: `tiny_model`), written
directly (no training), for the commands that read one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from astrai_ds.run_dir import LATEST, write_marker
from conftest import tiny_model


@pytest.fixture(scope="session")
def run_dir(workspace, tmp_path_factory):
    """A run folder as train.py leaves it after one save without ZeRO: what `astrai-ds export` reads."""
    run = tmp_path_factory.mktemp("run")
    model = tiny_model(workspace)
    (run / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    (run / "ds_config.json").write_text("{}")
    shutil.copyfile(workspace / "tokenizer" / "tokenizer.json", run / "tokenizer.json")
    checkpoint = run / "global_step1"
    checkpoint.mkdir()
    torch.save({"module": model.state_dict()}, checkpoint / "mp_rank_00_model_states.pt")
    write_marker(checkpoint, step=1, world_size=1, zero_stage=0)
    (run / LATEST).write_text(checkpoint.name)
    return run
