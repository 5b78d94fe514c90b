"""`astrai-ds eval`: every record is checked before the model loads, and a wrong file gets one clear line; the
loops show progress on stderr."""

from __future__ import annotations

import json

from conftest import VENV_BIN, cli_in_process, expect_user_error, run_cmd

CLI = str(VENV_BIN / "astrai-ds")


def _head(src, dst, n: int):
    """The first `n` lines of `src`, in `dst`."""
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return dst


def test_eval_checks_the_records_before_the_model(workspace, tmp_path, capsys):
    # The model folder does not exist: the records are checked first, so that is never reached.
    # (tests/inference/test_evaluate.py tries every wrong kind of record.)
    proc = cli_in_process(capsys, "eval", "--model", str(tmp_path / "no_model"), "--chat",
                          str(workspace / "corpus" / "pretrain_eval.jsonl"))
    expect_user_error(proc, "pretrain_eval.jsonl:1", "a facts record", "--data instead of --chat")


def test_eval_refuses_a_batch_size_of_zero(workspace, tmp_path, capsys):
    proc = cli_in_process(capsys, "eval", "--model", str(tmp_path), "--data",
                          str(workspace / "corpus" / "pretrain_eval.jsonl"), "--batch-size", "0")
    expect_user_error(proc, "--batch-size must be at least 1", "got 0")
    proc = cli_in_process(capsys, "eval", "--model", str(tmp_path), "--data",
                          str(workspace / "corpus" / "pretrain_eval.jsonl"), "--max-new-tokens", "0")
    expect_user_error(proc, "--max-new-tokens must be at least 1", "got 0")


def test_eval_refuses_a_folder_as_out_before_evaluating(workspace, tmp_path, capsys):
    proc = cli_in_process(capsys, "eval", "--model", str(tmp_path), "--data",
                          str(workspace / "corpus" / "pretrain_eval.jsonl"), "--out", str(tmp_path))
    expect_user_error(proc, "--out", "is a folder")


def test_eval_shows_the_progress_of_every_loop(workspace, model_dir, tmp_path):
    corpus = workspace / "corpus"
    files = {name: _head(corpus / name, tmp_path / name, 5)
             for name in ("pretrain_eval.jsonl", "sft_eval.jsonl", "dpo_eval.jsonl")}
    proc = run_cmd([CLI, "eval", "--model", str(model_dir), "--dtype", "fp32", "--batch-size", "2",
                    "--data", str(files["pretrain_eval.jsonl"]), "--chat", str(files["sft_eval.jsonl"]),
                    "--pairs", str(files["dpo_eval.jsonl"]), "--out", str(tmp_path / "out" / "eval.json")])
    # stderr is not a terminal here: plain lines, one per tenth of each loop, and the result alone on stdout
    for last in ("eval exact match: 5/5 requests", "eval chat: 5/5 requests", "eval pairs: 5/5 pairs"):
        assert last in proc.stderr, proc.stderr
    assert "eval pairs: 1/5 pairs" in proc.stderr
    result = json.loads(proc.stdout)
    assert result == json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["n"] == result["n_chat"] == result["n_pairs"] == 5


def test_eval_with_compiled_decoding_gives_the_same_numbers(workspace, model_dir, tmp_path, capsys):
    files = {name: _head(workspace / "corpus" / name, tmp_path / name, 6)
             for name in ("pretrain_eval.jsonl", "sft_eval.jsonl")}
    args = ["eval", "--model", str(model_dir), "--dtype", "fp32", "--batch-size", "3",
            "--data", str(files["pretrain_eval.jsonl"]), "--chat", str(files["sft_eval.jsonl"])]
    eager = cli_in_process(capsys, *args)
    compiled = cli_in_process(capsys, *args, "--compile")
    assert eager.returncode == compiled.returncode == 0, compiled.stderr
    assert "compile: the decode steps compile on their first use" in compiled.stderr
    assert "could not be compiled" not in compiled.stderr
    assert json.loads(compiled.stdout) == json.loads(eager.stdout)
