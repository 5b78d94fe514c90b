"""Shared fixtures: a small built-in corpus, a tokenizer and prepared shards, made once per session,
and a helper that starts the real `deepspeed` launcher."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import torch

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
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
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


def unavailable(reason: str) -> None:
    """Skip a test whose system packages are missing; fail it where scripts/test.sh could install them
    (ASTRAI_REQUIRE_CLUSTER_TESTS=1), so that a broken install step is not hidden as a skip."""
    if os.environ.get("ASTRAI_REQUIRE_CLUSTER_TESTS") == "1":
        pytest.fail(f"{reason} (ASTRAI_REQUIRE_CLUSTER_TESTS=1: this machine should run it)")
    pytest.skip(reason)


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


def launch(config: Path, ds_config: str = "zero2.json", nproc: int = 2, sets: list[str] = (), check: bool = True):
    """Train through the real `deepspeed` launcher with `nproc` CPU ranks."""
    port = free_port()
    cmd = deepspeed_cmd("train.py", nproc, port) + ["--config", str(config), "--ds_config", ds_config]
    for s in sets:
        cmd += ["--set", s]
    return run_distributed(cmd, port, check=check)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


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
