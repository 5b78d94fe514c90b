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
from astrai_ds.run_dir import COMPLETE, LATEST, atomic_write, list_checkpoints, resolve_checkpoint, write_marker
from astrai_ds.training.checkpoint import (check_resumable, find_checkpoint, prune_checkpoints,
                                           remove_incomplete_checkpoints)
from conftest import (ROOT, deepspeed_cmd, env, free_port, launch, read_metrics, remove_shm_buffers, run_python,
                      start_python, tiny_train_config, train_losses)


def fake_checkpoint(run, step, complete=True, world_size=2, zero_stage=2, pipeline_stages=1):
    path = run / f"global_step{step}"
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    (path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"y" * 300)
    if complete:
        write_marker(path, step, world_size, zero_stage, pipeline_stages)
    return path


def test_find_checkpoint(tmp_path):
    assert find_checkpoint("auto", tmp_path) is None
    assert find_checkpoint("none", tmp_path) is None
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)  # killed while writing
    atomic_write(tmp_path / LATEST, "global_step4")
    assert find_checkpoint("auto", tmp_path) == (tmp_path, "global_step4", [])
    assert find_checkpoint(str(tmp_path / "global_step2"), tmp_path / "other") == (tmp_path, "global_step2", [])
    assert find_checkpoint(str(tmp_path), tmp_path / "other") == (tmp_path, "global_step4", [])
    with pytest.raises(UserError, match="not a complete checkpoint"):
        find_checkpoint(str(tmp_path / "global_step6"), tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]


def test_latest_naming_incomplete_checkpoint_is_an_error(tmp_path):
    fake_checkpoint(tmp_path, 2, complete=False)
    atomic_write(tmp_path / LATEST, "global_step2")
    with pytest.raises(UserError, match="no usable checkpoint.*global_step2 is not a complete checkpoint"):
        find_checkpoint("auto", tmp_path)


def test_damaged_checkpoint_falls_back_on_auto_and_is_named_otherwise(tmp_path):
    """A truncated file inside a checkpoint marked complete: resume "auto" takes the previous complete one and
    says why; an explicit resume path and export name the damaged file and the checkpoints that are intact."""
    fake_checkpoint(tmp_path, 2)
    damaged = fake_checkpoint(tmp_path, 4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    atomic_write(tmp_path / LATEST, "global_step4")
    damaged.write_bytes(b"y" * 120)  # truncated after the marker was written
    load_dir, tag, notes = find_checkpoint("auto", tmp_path)
    assert (load_dir, tag) == (tmp_path, "global_step2")
    assert len(notes) == 1 and "skipping global_step4" in notes[0] and f"{damaged} is damaged: 120 bytes where " \
        "300 were saved" in notes[0]
    with pytest.raises(UserError, match=f"{damaged} is damaged.*complete checkpoints in .*: global_step2"):
        find_checkpoint(str(tmp_path / "global_step4"), tmp_path)
    with pytest.raises(UserError, match=f"{damaged} is damaged"):
        resolve_checkpoint(tmp_path)  # what export reads
    damaged.unlink()
    with pytest.raises(UserError, match=f"{damaged} is missing"):
        resolve_checkpoint(tmp_path, "global_step4")


def test_incomplete_checkpoints_are_removed_and_complete_ones_kept(tmp_path):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4, complete=False)
    (tmp_path / "global_stepX").mkdir()  # not a checkpoint name: not ours to delete
    assert remove_incomplete_checkpoints(tmp_path) == ["global_step4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step2", "global_stepX"]


def test_resume_with_another_zero_stage_or_world_size_is_refused(tmp_path):
    fake_checkpoint(tmp_path, 2, world_size=2, zero_stage=3)
    model = {"dim": 64}
    (tmp_path / "model_config.json").write_text('{"dim": 64}')
    assert check_resumable(tmp_path, "global_step2", 2, 3, model) is False  # the same: a plain resume
    with pytest.raises(UserError, match="ZeRO stage 3, this run 2.*stage.init_from"):
        check_resumable(tmp_path, "global_step2", 2, 2, model)
    # ZeRO's optimizer files convert to a universal checkpoint for another number of ranks
    assert check_resumable(tmp_path, "global_step2", 1, 3, model) is True
    with pytest.raises(UserError, match="model config"):
        check_resumable(tmp_path, "global_step2", 2, 3, {"dim": 128})
    # without ZeRO, or on pipeline stages, the ranks must match
    fake_checkpoint(tmp_path, 4, world_size=2, zero_stage=0)
    with pytest.raises(UserError, match="2 ranks, this run 1"):
        check_resumable(tmp_path, "global_step4", 1, 0, model)
    fake_checkpoint(tmp_path, 6, world_size=2, zero_stage=1, pipeline_stages=2)
    with pytest.raises(UserError, match="2 pipeline stages, this run 1"):
        check_resumable(tmp_path, "global_step6", 2, 1, model)
    with pytest.raises(UserError, match="2 ranks, this run 4"):
        check_resumable(tmp_path, "global_step6", 4, 1, model, pipeline_stages=2)
    # DeepSpeed's swap files of an optimizer offloaded to NVMe load only into the same offload on the same ranks
    (fake_checkpoint(tmp_path, 8, world_size=2, zero_stage=3) / "offloaded_tensors" / "rank00").mkdir(parents=True)
    assert check_resumable(tmp_path, "global_step8", 2, 3, model, nvme=True) is False
    with pytest.raises(UserError, match="the optimizer offloaded to NVMe, this run not offloading it there"):
        check_resumable(tmp_path, "global_step8", 2, 3, model)
    with pytest.raises(UserError, match="the optimizer not offloaded to NVMe, this run offloading it there"):
        check_resumable(tmp_path, "global_step2", 2, 3, model, nvme=True)
    with pytest.raises(UserError, match="2 ranks, this run 1"):
        check_resumable(tmp_path, "global_step8", 1, 3, model, nvme=True)


def test_prune_keeps_newest_and_latest(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step)
    atomic_write(tmp_path / LATEST, "global_step4")
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


@pytest.mark.multiproc  # a one-rank run in a process of its own, killed (or interrupted) midway
def test_killed_run_resumes_from_last_complete_checkpoint(workspace, tmp_path):
    """SIGKILL a one-rank run that checkpoints every step, at whatever moment it is in (often mid-save),
    then start it again: it resumes from `latest` and its losses equal an uninterrupted run's."""
    steps = 16
    common = dict(max_steps=steps, save_interval=1, keep_checkpoints=3, eval_interval=1000, precision="auto",
                  schedule__total_steps=steps)
    ref = tiny_train_config(workspace, tmp_path / "ref", **common)
    run_python("train.py", ["--config", str(ref)])

    cfg = tiny_train_config(workspace, tmp_path / "killed", **common)
    run = tmp_path / "killed" / "run"
    proc = start_python("train.py", ["--config", str(cfg)])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / LATEST).exists() and int((run / LATEST).read_text().strip()[len("global_step"):]) >= 3:
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    killed_at = int((run / LATEST).read_text().strip()[len("global_step"):])
    assert killed_at < steps, "the run finished before it could be killed"
    assert (run / f"global_step{killed_at}" / COMPLETE).exists()

    out = run_python("train.py", ["--config", str(cfg)])
    assert f"at step {killed_at}" in out.stdout
    expected, resumed = train_losses(tmp_path / "ref" / "run"), train_losses(run)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(killed_at + 1, steps + 1):
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
    # the signal went after 3 lines (step 0's evaluation, steps 1 and 2): it can be agreed on right after step 2
    assert 2 <= stopped_at < 100_000 and (run / f"global_step{stopped_at}" / COMPLETE).exists()
    assert max(train_losses(run)) == stopped_at

    resumed = launch(cfg, sets=[f"max_steps={stopped_at + 2}"])
    assert f"at step {stopped_at}" in resumed.stdout
    assert sorted(train_losses(run))[-2:] == [stopped_at + 1, stopped_at + 2]


TIMING = {"train/tokens_per_sec", "train/tokens_per_sec_per_rank", "train/mfu"}  # wall-clock: differ run to run


def _kill_after_checkpoint(cfg: Path, run: Path, step: int) -> None:
    """Start a one-rank run and SIGKILL it as soon as its checkpoint of `step` is complete."""
    proc = start_python("train.py", ["--config", str(cfg)])
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run / LATEST).exists() and (run / LATEST).read_text().strip() == f"global_step{step}":
            break
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert (run / LATEST).read_text().strip() == f"global_step{step}", "the run did not reach the checkpoint"


@pytest.mark.multiproc  # a one-rank run in a process of its own, killed (or interrupted) midway
def test_killed_at_each_checkpoint_logs_what_an_uninterrupted_run_logs(workspace, tmp_path):
    """Killed right after each checkpoint and resumed, a run gives the uninterrupted run's metrics.jsonl line for
    line (the lines logged after the checkpoint are dropped before they are logged again), the same evaluations
    and the same early-stop decision; TensorBoard shows each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # min_delta 10: no evaluation counts as an improvement, so early stop fires at the third evaluation after
    # the first (steps 0, 2, 4, 6): at step 6 of 10. log_interval 3 leaves partial sums in the checkpoints.
    common = dict(max_steps=10, save_interval=2, eval_interval=2, log_interval=3, keep_checkpoints=0,
                  schedule__total_steps=10, early_stop={"patience": 3, "min_delta": 10.0})
    ref = tiny_train_config(workspace, tmp_path / "ref", **common)
    full = run_python("train.py", ["--config", str(ref)])
    assert "early stop at step 6" in full.stdout

    cfg = tiny_train_config(workspace, tmp_path / "killed", **common)
    run = tmp_path / "killed" / "run"
    for step in (2, 4):
        _kill_after_checkpoint(cfg, run, step)
    resumed = run_python("train.py", ["--config", str(cfg)])
    assert "at step 4" in resumed.stdout and "early stop at step 6" in resumed.stdout

    def lines(run_dir):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]

    assert lines(run) == lines(tmp_path / "ref" / "run")
    events = EventAccumulator(str(run / "tb")).Reload()
    for tag in ("train/loss", "eval/loss"):
        steps = [e.step for e in events.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)  # each step once
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 4, 6]


def test_run_file_left_empty_by_a_kill_does_not_stop_a_resume(tmp_path):
    fake_checkpoint(tmp_path, 2, world_size=1, zero_stage=0)
    (tmp_path / "model_config.json").write_text("")  # a kill during a plain (non-atomic) write
    check_resumable(tmp_path, "global_step2", 1, 0, {"dim": 64})


def test_run_files_are_never_seen_half_written(tmp_path):
    """Another rank reading model_config.json while rank 0 rewrites the run files (a resume) sees a whole file,
    old or new, never an empty or half-written one."""
    import json
    import threading
    from types import SimpleNamespace

    from astrai_ds.training.run import _write_run_files

    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    versions = [{"dim": i, "pad": "x" * 20_000} for i in range(150)]

    def files(i):
        return (SimpleNamespace(to_dict=lambda: {"step": i}), SimpleNamespace(to_dict=lambda: versions[i]), {},
                SimpleNamespace(path=tokenizer, native=True))

    _write_run_files(tmp_path, *files(0))
    seen, done = [], threading.Event()

    def read():
        while not done.is_set():
            seen.append((tmp_path / "model_config.json").read_text())

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(1, len(versions)):
        _write_run_files(tmp_path, *files(i))
    done.set()
    reader.join()
    assert len(seen) > 10 and all(json.loads(text) in versions for text in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tokenizer.json", "train_config.json",
                                                                 "model_config.json", "ds_config.json"])
