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
