"""train.py outside the deepspeed launcher: plain python (one rank) and torchrun; and clear errors.
(mpirun, Slurm and the multi-node deepspeed launcher: tests/cluster.)"""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import (ROOT, VENV_BIN, expect_user_error, free_port, run_cmd, run_distributed, run_python,
                      tiny_train_config, train_in_process, train_losses)


def python_train(config):
    return run_cmd([str(VENV_BIN / "python"), "train.py", "--config", str(config), "--ds_config", "zero2.json"])


def config_error(capsys, config, *sets):
    """train.py's answer to a mistake it finds before setting up ranks (in this process: `train_in_process`)."""
    args = ["--config", str(config), "--ds_config", "zero2.json"]
    for s in sets:
        args += ["--set", s]
    return train_in_process(capsys, *args)


def test_plain_python_is_one_rank(workspace, tmp_path):
    proc = python_train(tiny_train_config(workspace, tmp_path, max_steps=2, save_interval=2))
    assert "world 1" in proc.stdout
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]
    assert (tmp_path / "run" / "latest").read_text().strip() == "global_step2"


@pytest.mark.multiproc
def test_torchrun(workspace, tmp_path):
    port = free_port()
    run_distributed([str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), "train.py",
                     "--config", str(tiny_train_config(workspace, tmp_path, max_steps=2, save_interval=2)),
                     "--ds_config", "zero3.json"], port)
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]


def test_error_unknown_key(workspace, tmp_path, capsys):
    cfg = tiny_train_config(workspace, tmp_path)
    expect_user_error(config_error(capsys, cfg, "data.seqlen=3"), "unknown key 'data.seqlen'",
                      "did you mean 'data.seq_len'")


def test_error_missing_data(workspace, tmp_path, capsys):
    cfg = tiny_train_config(workspace, tmp_path, data__path=str(tmp_path / "nodata"))
    expect_user_error(config_error(capsys, cfg), "nodata holds no prepared data", "astrai-ds prepare --stage pt")


def test_error_default_1b_config_without_data(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # where a user starts train.py
    expect_user_error(train_in_process(capsys), "configs/train/pt_1b.json")


def test_error_seq_len_above_max(workspace, tmp_path, capsys):
    cfg = tiny_train_config(workspace, tmp_path, data__seq_len=1000)
    expect_user_error(config_error(capsys, cfg), "data.seq_len 1000 is above the model's max_seq_len 128")


def test_error_vocab_too_small(workspace, tmp_path, capsys):
    model = tmp_path / "small_vocab.json"
    model.write_text(json.dumps({"vocab_size": 100, "dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
                                 "ffn_dim": 128, "max_seq_len": 128}))
    cfg = tiny_train_config(workspace, tmp_path, model=str(model))
    expect_user_error(config_error(capsys, cfg), "vocab_size 100 is smaller than the tokenizer's")


def test_error_other_tokenizer(workspace, tmp_path, capsys):
    from astrai_ds.data.tokenizer import train_tokenizer

    train_tokenizer([workspace / "corpus" / "pretrain.jsonl"], 400, tmp_path / "other_tok")
    cfg = tiny_train_config(workspace, tmp_path, tokenizer=str(tmp_path / "other_tok"))
    expect_user_error(config_error(capsys, cfg), "prepared with a different tokenizer")


def test_error_ds_batch_mismatch(workspace, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                              "train_batch_size": 10}))
    cfg = tiny_train_config(workspace, tmp_path)
    proc = run_python("train.py", ["--config", str(cfg), "--ds_config", str(ds)], check=False)
    expect_user_error(proc, "train_batch_size (10)", "(4)", "(2)", "data-parallel size (1)")
    assert not (tmp_path / "run").exists()  # checked before the run folder (and its lock file) is made


def test_error_truncated_shard(workspace, tmp_path, capsys):
    data = tmp_path / "pt"
    shutil.copytree(workspace / "data" / "pt", data)
    shard = sorted(data.glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    cfg = tiny_train_config(workspace, tmp_path, data__path=str(data))
    expect_user_error(config_error(capsys, cfg), shard.name)


def test_error_empty_output_dir(workspace, tmp_path, capsys):
    """`--set output_dir=` would train into the working directory."""
    cfg = tiny_train_config(workspace, tmp_path)
    expect_user_error(config_error(capsys, cfg, "output_dir="), "output_dir", "is empty")


def test_resume_with_another_zero_stage_is_refused_and_keeps_the_run_files(workspace, tmp_path):
    cfg = tiny_train_config(workspace, tmp_path, max_steps=2, save_interval=2)
    run_python("train.py", ["--config", str(cfg), "--ds_config", "zero2.json"])
    run = tmp_path / "run"
    before = {name: (run / name).read_bytes() for name in ("ds_config.json", "train_config.json")}
    proc = run_python("train.py", ["--config", str(cfg), "--ds_config", "zero3.json", "--set", "max_steps=4"],
                      check=False)
    expect_user_error(proc, "cannot resume from", "ZeRO stage 2, this run 3", "stage.init_from")
    assert {name: (run / name).read_bytes() for name in before} == before


def test_train_help_names_the_command_it_was_called_as():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # the two processes at once
        console, script = pool.map(run_cmd, [[str(VENV_BIN / "astrai-ds"), "train", "--help"],
                                             [str(VENV_BIN / "python"), "train.py", "--help"]])
    assert console.stdout.startswith("usage: astrai-ds train") and "(default: None)" not in console.stdout
    assert script.stdout.startswith("usage: train.py")


@pytest.mark.multiproc  # a one-rank run in a process of its own, killed (or interrupted) midway
def test_ctrl_c_ends_with_one_line_and_no_traceback(workspace, tmp_path):
    import signal
    import subprocess
    import time

    from conftest import ROOT, env

    cfg = tiny_train_config(workspace, tmp_path, max_steps=100000, save_interval=100000, log_interval=1)
    proc = subprocess.Popen([str(VENV_BIN / "python"), "train.py", "--config", str(cfg)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").exists():
        time.sleep(0.1)
    time.sleep(1)  # well inside the training loop
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "interrupted" in err, err
