"""What keeps a run from being lost or mixed up with another: the launcher watch and the signals that stop a
run with a checkpoint, the output-folder lock, and the message for a rendezvous port already in use."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.distributed as dist

from astrai_ds.errors import UserError
from astrai_ds.training.callbacks import StopOnSignal
from astrai_ds.training.distributed import DistInfo, rendezvous_error
from astrai_ds.run_dir import LOCK_FILE, output_dir_holder
from astrai_ds.training.guard import (Launcher, LauncherWatch, OutputDirInUse, RunLock, find_launchers, launcher_name,
                                      lock_output_dir, tolerate_lost_output)
from astrai_ds.training.trainer import TrainState
from conftest import (ROOT, VENV_BIN, deepspeed_cmd, env, expect_user_error, free_port, launch, process_ended,
                      read_metrics, remove_shm_buffers, run_distributed, tiny_train_config)

PYTHON = sys.executable


# --- which processes are launchers -------------------------------------------------------------------------

@pytest.mark.parametrize("argv, name", [
    (["/v/bin/python", "/v/bin/deepspeed", "--num_gpus", "2", "train.py"], "the deepspeed launcher"),
    (["/v/bin/python", "-u", "-m", "deepspeed.launcher.launch", "--world_info=e30=", "train.py"],
     "DeepSpeed's launch.py"),
    (["/v/bin/python", "/v/bin/torchrun", "--nproc_per_node", "2", "train.py"], "torchrun"),
    (["python3.11", "-X", "dev", "-m", "torch.distributed.run", "train.py"], "torchrun"),
    (["python", "/v/lib/site-packages/deepspeed/launcher/launch.py"], "DeepSpeed's launch.py"),
    (["python", "train.py", "deepspeed"], None),  # a user's script, whatever its arguments
    (["python", "-c", "import deepspeed"], None),
    (["/bin/bash", "-c", "deepspeed train.py"], None),  # a shell is never watched: nohup, a terminal's shell
    (["nohup", "deepspeed"], None),
    (["srun", "python", "train.py"], None),  # srun and mpirun end their tasks themselves
    (["mpirun", "-n", "2", "python", "train.py"], None),
    ([], None),
])
def test_launcher_name(argv, name):
    assert launcher_name(argv) == name


def _fake_launchers(tmp_path: Path) -> dict[str, Path]:
    """Scripts whose command lines look like the real launchers': each runs the command it is given."""
    runs_the_rest = "import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n"
    paths = {"deepspeed": tmp_path / "bin" / "deepspeed", "torchrun": tmp_path / "bin" / "torchrun",
             "launch.py": tmp_path / "deepspeed" / "launcher" / "launch.py"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(runs_the_rest)
    return paths


REPORT = ("import json; from astrai_ds.training.guard import find_launchers; "
          "print(json.dumps([l.name for l in find_launchers()]))")


def test_find_launchers_walks_up_through_launchers_only(tmp_path):
    fake = _fake_launchers(tmp_path)
    leaf = [PYTHON, "-c", REPORT]
    # A shell above the launchers (`; true` keeps bash from exec-ing the command): watched up to the shell only.
    chain = ["bash", "-c", " ".join([PYTHON, str(fake["deepspeed"]), PYTHON, "-u", str(fake["launch.py"])]
                                    + [f"'{a}'" for a in leaf]) + "; true"]
    out = subprocess.run(chain, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["DeepSpeed's launch.py", "the deepspeed launcher"]
    out = subprocess.run([PYTHON, str(fake["torchrun"]), *leaf], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == ["torchrun"]
    # Plain python under a shell, as with nohup or a terminal: nothing to watch.
    out = subprocess.run(["bash", "-c", f"{PYTHON} -c '{REPORT}'; true"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == []


def test_launcher_watch_sees_a_launcher_end(tmp_path):
    """A killed launcher counts as gone at once, before its parent reaps it; a reused pid is not the launcher."""
    fake = _fake_launchers(tmp_path)
    launcher = subprocess.Popen([PYTHON, str(fake["torchrun"]), PYTHON, "-c", "import time; time.sleep(120)"])
    try:
        deadline = time.time() + 30
        rank = None
        while rank is None and time.time() < deadline:
            rank = next((pid for pid in _pids() if _parent(pid) == launcher.pid), None)
            time.sleep(0.05)
        (found,) = find_launchers(rank)
        assert found.pid == launcher.pid and found.name == "torchrun" and found.running()
        assert not Launcher(found.pid, found.name, found.start_time + 1).running()  # same pid, another process
        seen = []
        watch = LauncherWatch((found,), seen.append, interval=0.05).start()
        time.sleep(0.3)
        assert seen == []
        launcher.kill()  # not reaped: a zombie until wait()
        deadline = time.time() + 10
        while not seen and time.time() < deadline:
            time.sleep(0.05)
        watch.stop()
        assert seen == [found] and launcher.poll() is not None
    finally:
        launcher.kill()
        launcher.wait()
        if rank is not None:
            try:
                os.kill(rank, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def _start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[19])


# --- StopOnSignal: signals and a lost launcher, in a world of one ------------------------------------------

@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1)
    dist.destroy_process_group()


@pytest.fixture
def harmless_signals(monkeypatch):
    """SIGTERM and SIGINT do nothing in this test process unless the code under test handles them; stdout and
    stderr are put back afterwards (a stop makes them tolerate a lost reader)."""
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _fake_trainer():
    lines = []
    return SimpleNamespace(state=TrainState(), start_step=0, log=lines.append, lines=lines)


def _run_steps(stop: StopOnSignal, trainer, steps: int, send=None) -> None:
    stop.on_train_begin(trainer)
    for step in range(1, steps + 1):
        if trainer.state.should_stop:
            break
        trainer.state.step = step
        if step == 2 and send is not None:
            os.kill(os.getpid(), send)
        stop.on_step_end(trainer, {})
    stop.on_train_end(trainer)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 0)])
def test_a_signal_stops_after_the_step_with_an_exit_code(world_of_one, harmless_signals, sig, code):
    trainer, stop = _fake_trainer(), StopOnSignal()
    before = signal.getsignal(sig)
    _run_steps(stop, trainer, 5, send=sig)
    assert trainer.state.should_stop and trainer.state.step == 2 and stop.exit_code == code
    assert trainer.lines == [f"{sig.name} received: stopping after step 2 with a checkpoint; run the same command "
                             f"again to resume"]
    assert signal.getsignal(sig) is before  # put back at the end of training


def test_a_second_ctrl_c_stops_at_once(world_of_one, harmless_signals):
    trainer, stop = _fake_trainer(), StopOnSignal()
    stop.on_train_begin(trainer)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here
    finally:
        stop.on_train_end(trainer)


def test_a_lost_launcher_stops_the_run(world_of_one, harmless_signals):
    launcher = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(120)"])
    try:
        alive = Launcher(launcher.pid, "torchrun", _start_time(launcher.pid))
        trainer, stop = _fake_trainer(), StopOnSignal((alive,))
        stop._watch.interval = 0.05
        stop.on_train_begin(trainer)
        trainer.state.step = 1
        stop.on_step_end(trainer, {})
        assert not trainer.state.should_stop
        launcher.kill()
        time.sleep(0.5)
        trainer.state.step = 2
        stop.on_step_end(trainer, {})
        stop.on_train_end(trainer)
        assert trainer.state.should_stop and stop.exit_code == 1
        assert trainer.lines == [f"torchrun (pid {launcher.pid}) is gone: stopping after step 2 with a checkpoint; "
                                 f"run the same command again to resume"]
    finally:
        launcher.kill()
        launcher.wait()

    # Gone before training began (while the run was being set up): stop before the first step.
    trainer, stop = _fake_trainer(), StopOnSignal((alive,))
    _run_steps(stop, trainer, 5)
    assert trainer.state.step == 0 and stop.exit_code == 1
    assert trainer.lines == [f"torchrun (pid {launcher.pid}) is gone: stopping before training, at step 0"]


def test_a_stopping_run_survives_a_lost_reader(monkeypatch):
    """`deepspeed ... | tee log` and Ctrl-C: tee is gone, and printing the stop line must not end the run before
    its checkpoint."""
    class GonePipe:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", GonePipe())
    monkeypatch.setattr(sys, "stderr", GonePipe())
    tolerate_lost_output()
    print("SIGINT received: stopping after step 3 with a checkpoint", flush=True)
    print("saved checkpoint", file=sys.stderr, flush=True)


# --- the output-folder lock --------------------------------------------------------------------------------

HOLD = ("import sys, time; from astrai_ds.training.guard import RunLock; RunLock.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


def _hold_lock(run: Path) -> subprocess.Popen:
    holder = subprocess.Popen([PYTHON, "-c", HOLD, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_run_cannot_lock_the_output_dir(tmp_path, world_of_one):
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        with pytest.raises(OutputDirInUse, match=f"is in use by another training run \\(pid {holder.pid} on "
                                                 f"{re.escape(socket.gethostname())}, started .*--set output_dir"):
            lock_output_dir(run, world_of_one)
        assert f"pid {holder.pid}" in output_dir_holder(run)
    finally:
        holder.kill()  # a killed run leaves nothing locked
        holder.wait()
    assert output_dir_holder(run) is None
    lock = lock_output_dir(run, world_of_one)
    assert lock.held and json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert (run / LOCK_FILE).read_text() == "" and output_dir_holder(run) is None
    with RunLock.acquire(run):  # the same process can take it again once released
        pass


def test_export_refuses_a_run_folder_still_being_trained_into(tmp_path):
    """`deepspeed ... && astrai-ds export ...`: DeepSpeed's runner exits 0 at once when launch.py is SIGKILLed,
    while the ranks are still saving their last checkpoint."""
    from astrai_ds.convert.export import export_run
    from astrai_ds.errors import UserError

    run = tmp_path / "run"
    run.mkdir()
    (run / "model_config.json").write_text("{}")
    with RunLock.acquire(run):
        with pytest.raises(UserError, match=f"{run} is still being trained into \\(pid {os.getpid()} "):
            export_run(run, tmp_path / "model")


def test_output_dir_holder_of_a_folder_never_locked(tmp_path):
    assert output_dir_holder(tmp_path) is None and output_dir_holder(tmp_path / "missing") is None


# --- the rendezvous port -----------------------------------------------------------------------------------

def test_rendezvous_error_names_the_port(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    error = rendezvous_error(dist.DistNetworkError(
        "The server socket has failed to listen on any local network address. port: 29500, useIpv6: false, "
        "code: -98, name: EADDRINUSE, message: address already in use"))
    assert isinstance(error, UserError) and "port 29500" in str(error) and "--master_port" in str(error)
    error = rendezvous_error(dist.DistStoreError("Timed out after 601 seconds waiting for clients. 1/2 clients "
                                                 "joined."))
    assert "127.0.0.1:29500" in str(error) and "--master_addr" in str(error)
    assert rendezvous_error(dist.DistError("something else")) is None


@pytest.mark.multiproc
def test_port_in_use_is_one_line_naming_it(workspace, tmp_path):
    with socket.socket() as taken:
        taken.bind(("", 0))  # every address, as the rendezvous binds
        taken.listen()
        port = taken.getsockname()[1]
        cmd = deepspeed_cmd("train.py", 2, port) + ["--config", str(tiny_train_config(workspace, tmp_path))]
        started = time.time()
        proc = run_distributed(cmd, port, check=False, timeout=300)
    expect_user_error(proc, f"port {port}", "already in use", "--master_port")
    assert time.time() - started < 120


# --- the real launchers ------------------------------------------------------------------------------------

def _run_processes(cfg: Path) -> dict[str, int]:
    """pid of each process of the run started with config `cfg`: 'launch.py' and the ranks ('rank0', ...)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if str(cfg) not in args:
            continue
        if "deepspeed.launcher.launch" in args:
            found["launch.py"] = int(proc.name)
        elif any(a.endswith("train.py") for a in args[:3]):
            found[f"rank{len([k for k in found if k.startswith('rank')])}"] = int(proc.name)
    return found


def _start_long_run(cmd: list[str], run: Path, log: Path, steps: int = 3) -> subprocess.Popen:
    """Start `cmd` and return once `run` has logged `steps` steps."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps + 1:
            return proc
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the run did not start training:\n{log.read_text()[-4000:]}")


def _long_config(workspace, tmp_path) -> Path:
    return tiny_train_config(workspace, tmp_path, max_steps=100_000, save_interval=100_000, eval_interval=100_000,
                             log_interval=1, schedule__total_steps=100_000)


@pytest.mark.multiproc
@pytest.mark.parametrize("victim, sig", [
    pytest.param(victim, sig, id=f"{victim}-{sig.name}")
    for victim, sig in [("deepspeed", signal.SIGKILL), ("deepspeed", signal.SIGINT), ("launch.py", signal.SIGKILL),
                        ("launch.py", signal.SIGTERM), ("torchrun", signal.SIGKILL)]])
def test_the_ranks_stop_with_a_checkpoint_when_their_launcher_is_killed(workspace, tmp_path, victim, sig):
    """Killing the `deepspeed` command (any signal), DeepSpeed's launch.py or torchrun: the ranks finish their
    step, save a complete checkpoint there together and exit within seconds, instead of training on alone."""
    cfg, run = _long_config(workspace, tmp_path), tmp_path / "run"
    port = free_port()
    if victim == "torchrun":
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), "train.py"]
    else:
        cmd = deepspeed_cmd("train.py", 2, port)
    proc = _start_long_run(cmd + ["--config", str(cfg), "--ds_config", "zero2.json"], run, tmp_path / "log.txt")
    pids = _run_processes(cfg)
    try:
        assert {"rank0", "rank1"} <= set(pids), pids
        os.kill(proc.pid if victim in ("deepspeed", "torchrun") else pids["launch.py"], sig)
        killed = time.time()
        while time.time() < killed + 60 and not all(process_ended(pid) for pid in pids.values()):
            time.sleep(0.1)
        log = (tmp_path / "log.txt").read_text()
        assert all(process_ended(pid) for pid in pids.values()), f"still training 60 s later:\n{log[-3000:]}"
    finally:
        for pid in pids.values():
            if not process_ended(pid):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        remove_shm_buffers(port)
    reason = f"{sig.name} received" if victim == "launch.py" and sig != signal.SIGKILL else "is gone"
    assert f"{reason}: stopping after step" in log, log[-3000:]
    stopped_at = max(r["step"] for r in read_metrics(run))
    assert (run / "latest").read_text().strip() == f"global_step{stopped_at}"
    assert (run / f"global_step{stopped_at}" / "COMPLETE").exists()


@pytest.mark.multiproc
def test_a_second_run_into_the_same_output_dir_is_refused(workspace, tmp_path):
    """The second run stops before touching the folder, naming the first; the first trains on undisturbed. Once
    every process of the first is killed (nothing released by hand), the folder is free again."""
    cfg, run = _long_config(workspace, tmp_path), tmp_path / "run"
    port = free_port()
    first = _start_long_run(deepspeed_cmd("train.py", 2, port) + ["--config", str(cfg)], run, tmp_path / "log.txt")
    pids = _run_processes(cfg)
    try:
        second = launch(cfg, sets=["max_steps=3"], check=False)
        expect_user_error(second, f"output_dir {run} is in use by another training run (pid {pids['rank0']} on "
                                  f"{socket.gethostname()}", "--set output_dir=")
        assert first.poll() is None
        steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
        assert steps == list(range(1, len(steps) + 1))  # the first run's lines only, in order
    finally:
        for pid in pids.values():  # a crash: every process of the first run dies at once
            os.kill(pid, signal.SIGKILL)
        first.kill()
        first.wait()
        remove_shm_buffers(port)
    deadline = time.time() + 30
    while time.time() < deadline and output_dir_holder(run) is not None:
        time.sleep(0.1)
    assert output_dir_holder(run) is None
