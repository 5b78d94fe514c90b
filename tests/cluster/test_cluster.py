"""train.py under the cluster launchers, each one real: `sbatch slurm/pt.sh` on a one-node Slurm, the
`deepspeed --hostfile` multi-node path (pdsh, ssh) across two hosts made of network namespaces, and
`mpirun` (mpi4py discovery).

Slurm and the two hosts need root and the Debian packages that scripts/install_cluster_deps.sh
installs (scripts/test.sh runs it). Where they cannot run the tests skip and say why; with
ASTRAI_REQUIRE_CLUSTER_TESTS=1 (set by scripts/test.sh where it can install them) they fail instead,
so a broken install never passes as a skip.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (ROOT, VENV_BIN, env, free_port, remove_shm_buffers, run_cmd, run_distributed,
                      tiny_train_config, train_losses, unavailable)

import local_slurm
import two_hosts

pytestmark = pytest.mark.multiproc
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def require_root_and(missing: list[str]) -> None:
    if os.geteuid() != 0:
        unavailable("needs root (daemons, network namespaces)")
    if missing:
        unavailable(f"not installed: {', '.join(missing)} (run scripts/install_cluster_deps.sh as root)")


def assert_trained(run_dir: Path, steps: int, log: str) -> None:
    """Every step logged, loss lower at the end than at the start, and a complete final checkpoint."""
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, steps + 1)), log
    assert losses[steps] < losses[1], (losses, log)
    assert (run_dir / "latest").read_text().strip() == f"global_step{steps}", log
    assert (run_dir / f"global_step{steps}" / "COMPLETE").exists(), log


# --- Slurm -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm():
    """One Slurm for the module's jobs (its daemons take a while to start and to stop)."""
    require_root_and(local_slurm.missing_commands())
    cluster = local_slurm.LocalSlurm()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def sbatch(cluster: local_slurm.LocalSlurm, script: str, *args: str, **env_vars: str) -> tuple[dict, str]:
    """Submit as a user would (from the project folder, with CONFIG=... in the environment), wait for
    the job, and return its final state and its log, which is moved out of the project's logs/."""
    job_env = {k: v for k, v in cluster.env(env()).items() if k not in LAUNCH_VARS}
    proc = subprocess.run(["sbatch", "--parsable", *args, script], cwd=ROOT, env={**job_env, **env_vars},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}\n{cluster.logs('slurmctld.log')}"
    job_id = proc.stdout.strip().split(";")[0]
    info = cluster.wait(job_id, timeout=240)
    log_path = Path(info["StdOut"])
    log = log_path.read_text(errors="replace") if log_path.exists() else f"(no log at {log_path})"
    log_path.unlink(missing_ok=True)
    port = 10000 + int(job_id) % 50000  # slurm/common.sh's MASTER_PORT
    remove_shm_buffers(port)
    return info, f"job {job_id}: {info['JobState']} exit {info.get('ExitCode')}\n--- {log_path.name}\n{log}"


def test_sbatch_slurm_pt(workspace, tmp_path, slurm):
    """`sbatch slurm/pt.sh` with 2 tasks: srun starts both ranks, the script maps Slurm's variables to
    RANK/WORLD_SIZE/MASTER_*, and CONFIG, OUTPUT_DIR and EXTRA_ARGS reach train.py. Submitting the
    job again with more steps resumes from its checkpoint."""
    config = tiny_train_config(workspace, tmp_path, max_steps=6, save_interval=3)
    run_dir = tmp_path / "slurm_run"  # not the config's output_dir: OUTPUT_DIR must win
    job = dict(CONFIG=str(config), OUTPUT_DIR=str(run_dir), EXTRA_ARGS="--set log_interval=1 --set seed=11")
    tasks = ("--ntasks-per-node", "2", "--cpus-per-task", "1")

    info, log = sbatch(slurm, "slurm/pt.sh", *tasks, **job)
    assert info["JobState"] == "COMPLETED", log
    assert "world 2" in log and "ZeRO-3" in log, log
    assert_trained(run_dir, 6, log)
    assert not (tmp_path / "run").exists(), log

    info, log = sbatch(slurm, "slurm/pt.sh", *tasks, **{**job, "EXTRA_ARGS": job["EXTRA_ARGS"] + " --set max_steps=8"})
    assert info["JobState"] == "COMPLETED", log
    assert "resumed from" in log and "global_step6 at step 6" in log, log
    assert sorted(train_losses(run_dir)) == list(range(1, 9)), log


def _last_step(run_dir: Path) -> int:
    return max(train_losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_slurm_time_limit_signal_checkpoints_and_requeues(workspace, tmp_path, slurm):
    """What happens before a job's time limit (`--signal=B:USR1@300`), with the signal sent by hand: the
    batch script passes USR1 to the ranks through srun, train.py saves a checkpoint after its current step
    and exits, and the script requeues the job."""
    config = tiny_train_config(workspace, tmp_path, max_steps=100_000, save_interval=100_000,
                               eval_interval=100_000, schedule__total_steps=100_000)
    run_dir = tmp_path / "slurm_run"
    job_env = {k: v for k, v in slurm.env(env()).items() if k not in LAUNCH_VARS}
    job_env.update(CONFIG=str(config), OUTPUT_DIR=str(run_dir), EXTRA_ARGS="--set log_interval=1")
    proc = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node", "2", "--cpus-per-task", "1", "slurm/pt.sh"],
                          cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    log_path = Path(slurm.job_state(job_id)["StdOut"])
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and _last_step(run_dir) < 3:
            time.sleep(0.2)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm.env(), check=True)
        while time.monotonic() < deadline and "requeueing job" not in _read(log_path):
            time.sleep(0.2)
        log = _read(log_path)
    finally:
        subprocess.run(["scancel", job_id], env=slurm.env(), check=False)  # the requeued job waits in the queue
        slurm.wait(job_id, timeout=60)
        log_path.unlink(missing_ok=True)
        remove_shm_buffers(10000 + int(job_id) % 50000)  # slurm/common.sh's MASTER_PORT
    assert "SIGUSR1 received: stopping after step" in log and "requeueing job" in log, log
    stopped_at = int((run_dir / "latest").read_text().strip()[len("global_step"):])
    assert 3 <= stopped_at < 100_000 and (run_dir / f"global_step{stopped_at}" / "COMPLETE").exists(), log


# --- two hosts through the deepspeed launcher's pdsh runner ------------------------------------------

@pytest.fixture(scope="module")
def hosts():
    """node1 and node2 for the module's tests (network namespaces with an sshd each)."""
    require_root_and(two_hosts.missing_commands())
    machines = two_hosts.TwoHosts()
    try:
        try:
            machines.start()
        except two_hosts.NoNetns as e:
            unavailable(f"network namespaces do not work here: {e}")
        yield machines
    finally:
        machines.stop()


def deepspeed_env(path: Path, **extra: str) -> Path:
    """The DeepSpeed env file. ssh gives the remote command a bare environment and the launcher forwards
    only a few variables by itself (PYTHON*, ...), so the venv's PATH, the built-op cache and thread
    and network settings go through this file, which the launcher exports on every node."""
    values = {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": env()["TORCH_EXTENSIONS_DIR"],
              "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", **extra}
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


def test_deepspeed_hostfile_two_hosts(workspace, tmp_path, hosts):
    """`deepspeed --hostfile` with node1 and node2 (1 slot each), run from node1 through pdsh and ssh:
    one rank per host, rank 0's address found over ssh, gloo over TCP between the hosts."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    # both hosts have the machine's hostname, which gloo would bind to: name the interface instead
    ds_env = deepspeed_env(tmp_path / "deepspeed_env", GLOO_SOCKET_IFNAME="eth0")
    config = tiny_train_config(workspace, tmp_path, max_steps=6, save_interval=3)
    cmd = hosts.cmd("node1", [VENV_BIN / "deepspeed", "--hostfile", hostfile, "--master_port", free_port(),
                              "train.py", "--config", config, "--ds_config", "zero2.json"])
    proc = run_cmd(cmd, timeout=300, check=False, extra_env={"DS_ENV_FILE": str(ds_env)})
    log = proc.stdout[-6000:] + proc.stderr[-8000:]
    assert proc.returncode == 0, log
    assert f"Using IP address of {hosts.addr['node1']} for node node1" in log, log
    for node_rank, host in enumerate(two_hosts.HOSTS):
        assert f"{host}: " in log and f"nnodes=2, num_local_procs=1, node_rank={node_rank}" in log, log
    assert "world 2" in log, log
    assert_trained(tmp_path / "run", 6, log)


def test_deepspeed_hostfile_localhost(workspace, tmp_path, hosts):
    """hostfiles/localhost as its header says to run it (--force_multi: through pdsh and `ssh localhost`),
    on node1, whose sshd stands in for the machine's own."""
    ds_env = deepspeed_env(tmp_path / "deepspeed_env", GLOO_SOCKET_IFNAME="lo")
    config = tiny_train_config(workspace, tmp_path, max_steps=2, save_interval=2)
    port = free_port()
    cmd = hosts.cmd("node1", [VENV_BIN / "deepspeed", "--hostfile", "hostfiles/localhost", "--force_multi",
                              "--master_addr", "127.0.0.1", "--master_port", port, "train.py", "--config", config])
    proc = run_distributed(cmd, port, check=False, timeout=300, extra_env={"DS_ENV_FILE": str(ds_env)})
    log = proc.stdout[-6000:] + proc.stderr[-8000:]
    assert proc.returncode == 0, log
    assert "pdsh -S" in log and "localhost: " in log and "world 2" in log, log
    assert sorted(train_losses(tmp_path / "run")) == [1, 2], log


# --- mpirun ----------------------------------------------------------------------------------------

def test_mpirun(workspace, tmp_path):
    """`mpirun -n 2 python train.py`: no RANK in the environment, DeepSpeed discovers the world through mpi4py
    (the test extra installs mpi4py and the mpich wheel)."""
    mpirun = VENV_BIN / "mpirun"
    if not mpirun.exists():
        unavailable("mpirun not installed in the venv: pip install -e '.[mpi]'")
    cfg = tiny_train_config(workspace, tmp_path, max_steps=2, save_interval=2)
    # DeepSpeed's MPI discovery always takes port 29500, so the shm buffers carry that port's name
    proc = run_distributed([str(mpirun), "-n", "2", str(VENV_BIN / "python"), "train.py", "--config", str(cfg),
                            "--ds_config", "zero2.json"], 29500)
    assert "world 2" in proc.stdout
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]
