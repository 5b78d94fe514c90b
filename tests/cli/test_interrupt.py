"""Ctrl-C ends a command with one line, `interrupted`, and exit code 130: no traceback from the command, its
worker processes or its progress bars."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil

from conftest import ROOT, VENV_BIN, env

CLI = str(VENV_BIN / "astrai-ds")


def _ctrl_c(cmd: list[str], when_ready) -> None:
    """Start `cmd` in a process group of its own, wait for `when_ready(proc)` to return, then send SIGINT to the
    whole group, as a terminal's Ctrl-C does; assert how the command ended."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        when_ready(proc)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "interrupted", err


def test_ctrl_c_during_eval(workspace, model_dir, tmp_path):
    lines = (workspace / "corpus" / "dpo_eval.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)[:20]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(lines * 50), encoding="utf-8")

    def evaluating(proc):  # the first progress line: the loop runs
        assert any(line.startswith("eval pairs:") for line in proc.stderr)

    _ctrl_c([CLI, "eval", "--model", str(model_dir), "--pairs", str(pairs)], evaluating)


def test_ctrl_c_during_prepare(workspace, tmp_path):
    text = tmp_path / "big.txt"
    text.write_text("".join(f"{i} + {i % 97} = {i + i % 97}. The number {i} comes before {i + 1}.\n"
                            for i in range(300_000)))

    def workers_first(proc):
        # The encoding workers get the terminal's SIGINT too, and may get it before the parent does: they must
        # leave it to the parent, which stops the pool.
        deadline = time.monotonic() + 60
        while len(workers := psutil.Process(proc.pid).children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) == 2
        time.sleep(0.5)  # the workers are encoding
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)
        time.sleep(0.5)

    _ctrl_c([CLI, "prepare", "--input", str(text), "--tokenizer", str(workspace / "tokenizer"), "--out",
             str(tmp_path / "out"), "--seq-len", "64", "--workers", "2"], workers_first)
