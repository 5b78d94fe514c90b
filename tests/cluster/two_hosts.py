"""Two hosts on one machine, for the multi-node path of the `deepspeed` launcher (pdsh over ssh).

node1 and node2 are network namespaces whose veth ends (each called eth0) sit on a bridge in a third
namespace, with addresses in a /24 that exists only inside them. Each runs its own sshd with a key made
here. `ip netns exec` bind-mounts /etc/netns/<ns>/hosts and /etc/netns/<ns>/ssh over /etc/hosts and
/etc/ssh, which gives every namespace the names node1 and node2, the sshd configuration and a client
configuration that uses the test's key and trusts any host key (no known_hosts to write).

Each sshd runs in a PID namespace of its own: on an interrupt the launcher runs `pkill -f` through
pdsh on every node, which must not reach processes outside the test. `unshare` ignores SIGTERM while
it waits, so teardown uses SIGKILL; with --kill-child that takes the sshd (PID 1 of its namespace),
and with it everything started over ssh.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

HOSTS = ("node1", "node2")
SUBNET = "10.213.47"
NEEDED = ("ip", "unshare", "ssh", "ssh-keygen", "pdsh", "sshd")


class NoNetns(RuntimeError):
    """This machine (or container) does not let us make network namespaces."""


def missing_commands() -> list[str]:
    path = f"{os.environ.get('PATH', '')}:/usr/sbin"
    return [c for c in NEEDED if not shutil.which(c, path=path)]


class TwoHosts:
    """`start()`, then `stop()` always (it also cleans up after a failed start); `cmd(host, argv)` runs
    argv on a host (in its network namespace)."""

    def __init__(self):
        tag = str(os.getpid())
        self.ns = {h: f"astrai-{h}-{tag}" for h in HOSTS}
        self.bridge_ns = f"astrai-br-{tag}"
        self.addr = {h: f"{SUBNET}.{i}" for i, h in enumerate(HOSTS, 1)}
        self.dir = Path(tempfile.mkdtemp(prefix="astrai-hosts-"))
        self.procs: list[subprocess.Popen] = []
        self.made_netns: list[str] = []
        self.made_dirs: list[Path] = []  # system folders that did not exist before, removed if left empty

    def cmd(self, host: str, argv: list) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *map(str, argv)]

    def _run(self, *argv) -> None:
        proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} failed: {proc.stderr.strip()}")

    def _mkdir(self, path: Path) -> None:
        if not path.exists():
            path.mkdir(parents=True)
            self.made_dirs.append(path)

    def _add_netns(self, name: str) -> None:
        try:
            self._run("ip", "netns", "add", name)
        except RuntimeError as e:
            raise NoNetns(str(e)) from None
        self.made_netns.append(name)

    def start(self) -> None:
        key = self.dir / "id_ed25519"
        self._run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "astrai-test", "-f", key)
        (self.dir / "authorized_keys").write_text(key.with_suffix(".pub").read_text())

        self._add_netns(self.bridge_ns)
        self._run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        self._run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        self._mkdir(Path("/etc/netns"))
        for host, ns in self.ns.items():
            self._add_netns(ns)
            self._run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", host,
                      "netns", self.bridge_ns)
            self._run("ip", "-n", self.bridge_ns, "link", "set", host, "master", "br0", "up")
            self._run("ip", "-n", ns, "addr", "add", f"{self.addr[host]}/24", "dev", "eth0")
            self._run("ip", "-n", ns, "link", "set", "eth0", "up")
            self._run("ip", "-n", ns, "link", "set", "lo", "up")
            self._write_etc(Path("/etc/netns") / ns)
        self._mkdir(Path("/run/sshd"))  # sshd's privilege-separation folder
        for host in HOSTS:
            log = open(self.dir / f"sshd_{host}.log", "wb")
            self.procs.append(subprocess.Popen(
                self.cmd(host, ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc",
                                shutil.which("sshd", path="/usr/sbin:/usr/bin"), "-D", "-e"]),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            log.close()
        self._wait_for_ssh()

    def _write_etc(self, etc: Path) -> None:
        (etc / "ssh").mkdir(parents=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in self.addr.items()))
        self._run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", etc / "ssh" / "ssh_host_ed25519_key")
        (etc / "ssh" / "sshd_config").write_text(
            "HostKey /etc/ssh/ssh_host_ed25519_key\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nPrintMotd no\nPidFile none\n")
        (etc / "ssh" / "ssh_config").write_text(
            f"Host *\n  IdentityFile {self.dir / 'id_ed25519'}\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n")

    def _wait_for_ssh(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        for host in HOSTS:
            while True:
                proc = subprocess.run(self.cmd("node1", ["ssh", host, "true"]), capture_output=True, text=True)
                if proc.returncode == 0:
                    break
                dead = [p for p in self.procs if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    logs = "\n".join(p.read_text() for p in sorted(self.dir.glob("sshd_*.log")))
                    raise RuntimeError(f"ssh node1 -> {host} does not work: {proc.stderr.strip()}\n{logs}")
                time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
        self.procs.clear()
        for name in reversed(self.made_netns):  # deleting a namespace deletes its veth ends and bridge
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.made_netns.clear()
        for ns in self.ns.values():
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for path in reversed(self.made_dirs):
            try:
                path.rmdir()
            except OSError:
                pass  # something else put files there since
        self.made_dirs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
