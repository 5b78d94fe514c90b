"""Opening a run's prepared data: a folder made for another stage or tokenizer is refused, and the command
the message suggests never writes over the data the user pointed at."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from astrai_ds.data.shards import ShardWriter
from astrai_ds.errors import DataError
from astrai_ds.training.data_setup import open_data


def _shards(out: Path, stage: str, tokenizer_hash: str) -> None:
    w = ShardWriter(out, 1000, {"stage": stage, "tokenizer_hash": tokenizer_hash}, masks=stage != "pt")
    w.add([1, 5, 6, 2], *([[0, 1, 1, 1]] if stage != "pt" else []))
    w.close()


def _open(path: Path, stage: str):
    cfg = SimpleNamespace(stage=SimpleNamespace(type=stage), tokenizer="tok", data=SimpleNamespace(seq_len=64))
    tokenizer = SimpleNamespace(hash="a" * 64, path="tok/tokenizer.json")
    return open_data(str(path) + "/", "data.path", cfg, tokenizer, Path("train.json"))


def test_stage_mismatch_suggests_a_new_folder(tmp_path):
    _shards(tmp_path / "chats", "sft", "a" * 64)
    with pytest.raises(DataError, match="prepared for stage 'sft'") as e:
        _open(tmp_path / "chats", "pt")
    command = re.search(r"`(astrai-ds prepare [^`]*)`", str(e.value)).group(1)
    assert "--stage pt" in command and "--overwrite" not in command
    out = Path(command.split("--out ")[1].split()[0])
    assert out == tmp_path / "chats_pt" and out.resolve() != (tmp_path / "chats").resolve()


def test_tokenizer_mismatch_says_the_command_replaces_the_data(tmp_path):
    _shards(tmp_path / "text", "pt", "b" * 64)
    with pytest.raises(DataError, match="different tokenizer") as e:
        _open(tmp_path / "text", "pt")
    assert re.search(r"--out \S+ --overwrite` \(this replaces the data in ", str(e.value)), str(e.value)
