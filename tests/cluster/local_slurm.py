"""A real one-node Slurm cluster on localhost, for submitting slurm/*.sh as a user would.

Everything lives in one temporary folder: the munge key and socket, slurm.conf, the daemons' state,
spool, logs and pid files, and slurmctld and slurmd listen on free ports, so nothing system-wide is
used and a Slurm already on the machine is left alone. The daemons run in the foreground as our own
children, so stopping them kills exactly the processes started here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from astrai_ds.launch_env import free_port

SLURM_COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "squeue",
                  "sinfo")
DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
               "DEADLINE", "PREEMPTED"}


def missing_commands() -> list[str]:
    return [c for c in SLURM_COMMANDS if not shutil.which(c, path=f"{os.environ.get('PATH', '')}:/usr/sbin")]


class LocalSlurm:
    """munged + slurmctld + slurmd on 127.0.0.1: `start()`, then `stop()` always (it also cleans up after
    a failed start); `env()` is the environment that points sbatch and scontrol at this cluster."""

    def __init__(self):
        # munged wants every folder above its socket searchable by all, which pytest's 0700 tmp_path is not.
        self.dir = Path(tempfile.mkdtemp(prefix="astrai-slurm-"))
        self.dir.chmod(0o711)
        self.conf = self.dir / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    def env(self, base: dict | None = None) -> dict:
        e = dict(os.environ if base is None else base)
        e["SLURM_CONF"] = str(self.conf)
        return e

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = open(self.dir / f"{name}.out", "wb")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                           stdin=subprocess.DEVNULL))
        log.close()

    def start(self) -> None:
        d = self.dir
        key = d / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)  # munged refuses a key that others can read
        sock = d / "munge.sock"
        self._daemon("munged", ["munged", "--foreground", f"--key-file={key}", f"--socket={sock}",
                                f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}",
                                f"--log-file={d / 'munged.log'}"])
        self._wait_for(sock.exists, "munged", "munged.out")

        node = subprocess.run(["slurmd", "-C"], check=True, capture_output=True, text=True).stdout.splitlines()[0]
        host = node.split()[0].split("=", 1)[1]
        (d / "state").mkdir()
        (d / "spool").mkdir()
        self.conf.write_text("\n".join([
            "ClusterName=astraitest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", f"AuthInfo=socket={sock}", "CredType=cred/munge",
            "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={d / 'state'}", f"SlurmdSpoolDir={d / 'spool'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd.log'}",
            # no systemd and no cgroup delegation here: track tasks through /proc, bind nothing
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "MpiDefault=none", "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._daemon("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait_for(self._node_idle, "slurmctld/slurmd", "slurmctld.log", "slurmd.log")

    def _node_idle(self) -> bool:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env(), capture_output=True, text=True)
        return proc.returncode == 0 and proc.stdout.strip().startswith("idle")

    def _wait_for(self, ready, what: str, *logs: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start ({'exited: ' + ', '.join(dead) if dead else 'timeout'})\n"
                                   + self.logs(*logs))
            time.sleep(0.2)

    def logs(self, *names: str) -> str:
        return "\n".join(f"--- {n}\n{(self.dir / n).read_text(errors='replace')[-4000:]}"
                         for n in names if (self.dir / n).exists())

    def job_state(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, StdOut, ...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env(), capture_output=True,
                             text=True, check=True).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll until the job has ended; cancel it (and say so) when it takes longer than `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_state(job_id)
            if info["JobState"] in DONE_STATES:
                return info
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], env=self.env(), check=False)
                self._wait_for(lambda: self.job_state(job_id)["JobState"] in DONE_STATES, f"scancel {job_id}")
                info = self.job_state(job_id)
                info["JobState"] += f" (cancelled by the test after {timeout:.0f} s)"
                return info
            time.sleep(0.5)

    def _jobs(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True, text=True)
        return out.stdout.split() if out.returncode == 0 else []

    def stop(self) -> None:
        """Cancel the jobs still in the queue and wait for their tasks to go (slurmd's job steps outlive
        slurmd), kill the daemons started here by pid, and remove the folder."""
        if self.procs and all(p.poll() is None for p in self.procs):
            jobs = self._jobs()
            if jobs:
                subprocess.run(["scancel", *jobs], env=self.env(), capture_output=True, timeout=30)
                deadline = time.monotonic() + 60
                while self._jobs() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
