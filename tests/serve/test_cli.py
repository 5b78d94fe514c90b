"""`astrai-ds serve`'s wrong options: one clear message each, before the model loads."""

from __future__ import annotations

import socket
import subprocess

import pytest

from astrai_ds.cli.serve import parse_kv_budget
from conftest import cli_in_process, expect_user_error


def _serve(capsys, *args: str) -> subprocess.CompletedProcess:
    return cli_in_process(capsys, "serve", *args)


def test_kv_budget_takes_tokens_or_a_memory_size():
    assert parse_kv_budget("65536") == {"kv_cache_tokens": 65536}
    assert parse_kv_budget("2GiB") == {"kv_cache_memory": 2 << 30}
    assert parse_kv_budget("512 MiB") == {"kv_cache_memory": 512 << 20}
    assert parse_kv_budget("2GB") == {"kv_cache_memory": 2 * 10**9}  # as `plan --gpu-memory` reads it


@pytest.mark.parametrize("args,fragments", [
    (["--kv-budget", "lots"], ["--kv-budget 'lots'", "2GiB"]),
    (["--port", "0"], ["--port must be in 1..65535"]),
    (["--max-running", "0"], ["--max-running must be at least 1"]),
    (["--tp", "2"], ["--tp 2 needs 2 processes", "deepspeed --num_gpus 2 --module astrai_ds serve --tp 2"]),
])
def test_wrong_options(capsys, model_dir, args, fragments):
    expect_user_error(_serve(capsys, "--model", str(model_dir), *args), *fragments)


def test_a_missing_model_folder(capsys, tmp_path):
    expect_user_error(_serve(capsys, "--model", str(tmp_path / "nowhere")), str(tmp_path / "nowhere"))


def test_a_port_in_use_fails_before_the_model_loads(capsys, model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        expect_user_error(_serve(capsys, "--model", str(model_dir), "--port", str(port)),
                          f"cannot listen on 127.0.0.1:{port}", "--port")


# Loaded by the server's Python at start-up (sitecustomize on PYTHONPATH): the model step fails for a prompt that
# starts with FAIL_PROMPT, as a broken device or a bug in the model would make it fail. Test-only fault injection.
FAIL_PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
INJECT = f"""
from astrai_ds.inference import model_runner

_run = model_runner.ModelRunner.run


def run(self, scheduled):
    if any(s.seq.prompt_ids[:{len(FAIL_PROMPT)}] == {FAIL_PROMPT} for s in scheduled):
        raise RuntimeError("the model step failed (injected by the test)")
    return _run(self, scheduled)


model_runner.ModelRunner.run = run
"""


@pytest.mark.multiproc  # a server process of its own, failed on purpose
def test_a_failed_model_step_stops_the_server_with_exit_1(model_dir, tmp_path):
    """Only a failure of the model step itself fails the engine; then the server does not live on answering 500s:
    it stops and exits 1, for a supervisor to start it again."""
    import httpx2 as httpx

    from tests.serve.conftest import Server

    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(INJECT)
    server = Server(model_dir, tmp_path / "server.log", extra_env={"PYTHONPATH": str(tmp_path / "inject")})
    try:
        ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": [7, 8, 9], "max_tokens": 2}, timeout=60)
        assert ok.status_code == 200, ok.text
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": FAIL_PROMPT, "max_tokens": 2}, timeout=60)
        assert r.status_code == 500 and "injected by the test" in r.json()["error"]["message"], r.text
        assert server.proc.wait(60) == 1
        assert "the engine failed" in server.log() and "exits 1" in server.log()
    finally:
        server.stop()
