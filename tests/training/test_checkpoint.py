"""Checkpoint bookkeeping without DeepSpeed: which checkpoint resume picks, and that a run killed at any
moment resumes from the last complete checkpoint and continues the uninterrupted run exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from astrai_ds.errors import UserError
from astrai_ds.training.checkpoint import (COMPLETE, LATEST, atomic_write, find_checkpoint, list_checkpoints,
                                           prune_checkpoints)
from conftest import (ROOT, VENV_BIN, deepspeed_cmd, env, free_port, launch, remove_shm_buffers, run_cmd,
                      tiny_train_config,
                      train_losses)


def fake_checkpoint(run, step, complete=True):
    path = run / f"global_step{step}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (path / COMPLETE).write_text(f"{step}\n")
    return path


def test_find_checkpoint(tmp_path):
    assert find_checkpoint("auto", tmp_path) is None
    assert find_checkpoint("none", tmp_path) is None
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)  # killed while writing
    atomic_write(tmp_path / LATEST, "global_step4")
    assert find_checkpoint("auto", tmp_path) == (tmp_path, "global_step4")
    assert find_checkpoint(str(tmp_path / "global_step2"), tmp_path / "other") == (tmp_path, "global_step2")
    assert find_checkpoint(str(tmp_path), tmp_path / "other") == (tmp_path, "global_step4")
    with pytest.raises(UserError, match="not a complete checkpoint"):
        find_checkpoint(str(tmp_path / "global_step6"), tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]


def test_latest_naming_incomplete_checkpoint_is_an_error(tmp_path):
    fake_checkpoint(tmp_path, 2, complete=False)
    atomic_write(tmp_path / LATEST, "global_step2")
    with pytest.raises(UserError, match="missing or incomplete"):
        find_checkpoint("auto", tmp_path)


def test_prune_keeps_newest_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    atomic_write(tmp_path / LATEST, "global_step4")
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_killed_run_resumes_from_last_complete_checkpoint(workspace, tmp_path):
    """SIGKILL a one-rank run that checkpoints every step, at whatever moment it is in (often mid-save),
    then start it again: it resumes from `latest` and its losses equal an uninterrupted run's."""
    common = dict(max_steps=30, save_interval=1, keep_checkpoints=3, eval_interval=1000, precision="auto",
                  schedule__total_steps=30)
    ref = tiny_train_config(workspace, tmp_path / "ref", **common)
    run_cmd([str(VENV_BIN / "python"), "train.py", "--config", str(ref)])

    cfg = tiny_train_config(workspace, tmp_path / "killed", **common)
    run = tmp_path / "killed" / "run"
    proc = subprocess.Popen([str(VENV_BIN / "python"), "train.py", "--config", str(cfg)], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / LATEST).exists() and int((run / LATEST).read_text().strip()[len("global_step"):]) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int((run / LATEST).read_text().strip()[len("global_step"):])
    assert killed_at < 30, "the run finished before it could be killed"
    assert (run / f"global_step{killed_at}" / COMPLETE).exists()

    out = run_cmd([str(VENV_BIN / "python"), "train.py", "--config", str(cfg)])
    assert f"at step {killed_at}" in out.stdout
    expected, resumed = train_losses(tmp_path / "ref" / "run"), train_losses(run)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(killed_at + 1, 31):
        assert resumed[step] == expected[step], step


def _rank_pid(config, local_rank: int) -> int | None:
    """The pid of the train.py process of `local_rank` started with `config` (read from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in args and f"--local_rank={local_rank}".encode() in args:
            return int(proc.name)
    return None


@pytest.mark.multiproc
def test_sigusr1_saves_a_checkpoint_and_stops(workspace, tmp_path):
    """SIGUSR1 to one rank only (as a scheduler's warning may reach ranks at different moments): both ranks
    stop after the same step, the run saves a complete checkpoint there, exits cleanly and resumes from it."""
    cfg = tiny_train_config(workspace, tmp_path, max_steps=100_000, save_interval=100_000, eval_interval=100_000,
                            log_interval=1, schedule__total_steps=100_000)
    run = tmp_path / "run"
    port = free_port()
    cmd = deepspeed_cmd("train.py", 2, port) + ["--config", str(cfg), "--ds_config", "zero2.json"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            metrics = run / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        pid = _rank_pid(cfg, 1)
        assert pid is not None and proc.poll() is None, "rank 1 is not running"
        os.kill(pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        remove_shm_buffers(port)
    assert proc.returncode == 0, out[-4000:]
    assert "SIGUSR1 received: stopping after step" in out
    stopped_at = int((run / LATEST).read_text().strip()[len("global_step"):])
    assert 3 <= stopped_at < 100_000 and (run / f"global_step{stopped_at}" / COMPLETE).exists()
    assert max(train_losses(run)) == stopped_at

    resumed = launch(cfg, sets=[f"max_steps={stopped_at + 2}"])
    assert f"at step {stopped_at}" in resumed.stdout
    assert sorted(train_losses(run))[-2:] == [stopped_at + 1, stopped_at + 2]
