"""The `astrai-ds` command line: help for every subcommand, and one clear line for expected mistakes."""

from __future__ import annotations

import json
import re

import pytest

from astrai_ds.cli.main import COMMANDS, build_parser
from conftest import VENV_BIN, cli_in_process, expect_user_error, run_cmd

CLI = str(VENV_BIN / "astrai-ds")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    proc = cli_in_process(capsys, command, "--help")  # the `astrai-ds` command itself: test_train_help_is_train_py_help
    assert proc.returncode == 0 and "usage:" in proc.stdout and len(proc.stdout.splitlines()) > 3


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"train"}))  # train.py's help is train.py's
def test_help_shows_a_default_once_and_only_when_there_is_one(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    for entry in re.split(r"\n  (?=-)", options):  # one entry per option, its help wrapped over lines
        text = " ".join(entry.split())
        assert "default: None" not in text and text.count("default") <= 1, text


def test_train_help_is_train_py_help():
    out = run_cmd([CLI, "train", "--help"]).stdout
    assert "--ds_config" in out and "--set" in out


def test_prepare_empty_corpus(workspace, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"title": "no text"}\n')
    proc = cli_in_process(capsys, "prepare", "--stage", "pt", "--input", str(empty), "--tokenizer",
                          str(workspace / "tokenizer"), "--out", str(tmp_path / "out"))
    expect_user_error(proc, "empty corpus", "empty.jsonl")


def test_prepare_missing_tokenizer(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("hello\n")
    proc = cli_in_process(capsys, "prepare", "--input", str(text), "--tokenizer", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "out"))
    expect_user_error(proc, "nope", "astrai-ds tokenizer")


def test_export_of_a_folder_without_checkpoints(tmp_path, capsys):
    expect_user_error(cli_in_process(capsys, "export", "--run", str(tmp_path), "--out", str(tmp_path / "m")),
                      "not a run folder")


def test_eval_of_a_missing_model(tmp_path, capsys):
    data = tmp_path / "e.jsonl"
    data.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2"}) + "\n")
    expect_user_error(cli_in_process(capsys, "eval", "--model", str(tmp_path), "--data", str(data)),
                      "not a model folder", "astrai-ds export")


def test_eval_responses_need_chat_questions(tmp_path, capsys):
    data = tmp_path / "e.jsonl"
    data.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2"}) + "\n")
    proc = cli_in_process(capsys, "eval", "--model", str(tmp_path), "--data", str(data), "--responses",
                          str(tmp_path / "r.jsonl"))
    expect_user_error(proc, "--responses", "give --chat too")


def test_corpus_tokenizer_prepare_round(tmp_path, capsys):
    for argv in (["corpus", "--out", str(tmp_path / "c"), "--scale", "0.05"],
                 ["tokenizer", "--input", str(tmp_path / "c" / "pretrain.jsonl"), "--vocab-size", "400", "--out",
                  str(tmp_path / "t")],
                 ["prepare", "--stage", "pt", "--input", str(tmp_path / "c" / "pretrain.jsonl"), "--tokenizer",
                  str(tmp_path / "t"), "--out", str(tmp_path / "d"), "--seq-len", "64"]):
        proc = cli_in_process(capsys, *argv)
        assert proc.returncode == 0, proc.stderr
    assert "documents" in proc.stdout and (tmp_path / "d" / "index.json").exists()


@pytest.mark.parametrize("command", ["corpus", "tokenizer", "prepare"])
def test_out_naming_a_file(command, workspace, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder\n")
    args = {"corpus": ["--scale", "0.01"],
            "tokenizer": ["--input", str(workspace / "corpus" / "pretrain_eval.jsonl"), "--vocab-size", "300"],
            "prepare": ["--input", str(workspace / "corpus" / "pretrain_eval.jsonl"), "--tokenizer",
                        str(workspace / "tokenizer")]}[command]
    for out in (taken, taken / "sub"):  # the folder itself, or a folder above it
        proc = cli_in_process(capsys, command, *args, "--out", str(out))
        expect_user_error(proc, str(taken), "is a file, not a folder", "--out")
    assert taken.read_text() == "not a folder\n"


def test_prepare_keeps_prepared_data_unless_overwrite(workspace, tmp_path, capsys):
    pairs, pretrain = workspace / "corpus" / "dpo_eval.jsonl", workspace / "corpus" / "pretrain_eval.jsonl"
    common = ["--tokenizer", str(workspace / "tokenizer"), "--out", str(tmp_path / "data"), "--seq-len", "64"]
    assert cli_in_process(capsys, "prepare", "--stage", "dpo", "--input", str(pairs), *common).returncode == 0
    index = (tmp_path / "data" / "index.json").read_bytes()
    proc = cli_in_process(capsys, "prepare", "--stage", "pt", "--input", str(pretrain), *common)
    expect_user_error(proc, str(tmp_path / "data"), "stage dpo", "new folder", "--overwrite")
    assert (tmp_path / "data" / "index.json").read_bytes() == index
    assert cli_in_process(capsys, "prepare", "--stage", "pt", "--input", str(pretrain), *common,
                          "--overwrite").returncode == 0
    assert json.loads((tmp_path / "data" / "index.json").read_text())["stage"] == "pt"


def test_tokenizer_says_when_it_learns_fewer_tokens_than_asked(tmp_path, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("one two three\n")
    proc = cli_in_process(capsys, "tokenizer", "--input", str(text), "--vocab-size", "2048", "--out",
                          str(tmp_path / "t"))
    assert proc.returncode == 0, proc.stderr
    assert "of the 2048 tokens asked for" in proc.stdout and "too small" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr
