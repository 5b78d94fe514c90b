"""A real `astrai-ds serve` process on 127.0.0.1 and a random free port, on the test model folder (fp32,
greedy-comparable), and what the tests read from it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx2 as httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from astrai_ds.inference.engine import LLMEngine
from astrai_ds.model.io import load_model_folder
from conftest import ROOT, VENV_BIN, env, free_port

CLI = str(VENV_BIN / "astrai-ds")


class Server:
    def __init__(self, model_dir, log_path, *args: str, extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([CLI, "serve", "--model", str(model_dir), "--dtype", "fp32", "--port",
                                      str(self.port), "--seed", "0", *args], cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, env={**env(), **(extra_env or {})})
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise AssertionError(f"the server did not become healthy:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (labels folded into the name as name{k=v})."""
        return self.metrics_with({})

    def metrics_with(self, headers: dict) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="package")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    code = s.stop()
    assert code == 0, s.log()


@pytest.fixture(scope="package")
def engine(model_dir):
    """The same model in this process: what a request gives alone."""
    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    return LLMEngine(model, tokenizer)


RAG_DOC = "# Vela\n\nVela's capital is Orin.\n\n## Trade\n\nVela exports glass.\n\n# Kiro\n\nKiro is a river.\n"


@pytest.fixture(scope="package")
def rag_server(long_model_dir, tmp_path_factory):
    """(server, index): a server with an index of RAG_DOC, on the 512-token test model (room for retrieved chunks
    in a prompt), which also serves `<name>-rag`; shared by the RAG and chat-page tests."""
    from astrai_ds.rag.index import Index
    from conftest import run_cmd

    work = tmp_path_factory.mktemp("rag_serve")
    (work / "docs").mkdir()
    (work / "docs" / "world.md").write_text(RAG_DOC, encoding="utf-8")
    run_cmd([CLI, "rag", "index", "--docs", str(work / "docs"), "--model", str(long_model_dir), "--out",
             str(work / "index"), "--max-tokens", "24", "--dtype", "fp32"])
    s = Server(long_model_dir, work / "server.log", "--rag-index", str(work / "index"))
    yield s, Index.load(work / "index")
    assert s.stop() == 0, s.log()


def wait_idle(server: Server, timeout: float = 30) -> dict:
    """The metrics once no request is running and no KV block is held (aborts land at the next engine step)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["astrai_requests_running"] == m["astrai_requests_waiting"] == m["astrai_kv_cache_blocks_used"] == 0:
            return m
        if time.monotonic() > deadline:
            return m
        time.sleep(0.1)


os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
