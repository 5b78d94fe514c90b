"""`astrai-ds generate`: a streamed --prompt and a --input/--output batch give what the engine gives in-process
on the same model folder; the batch keeps its order and per-request fields, and a request the engine refuses
leaves the others alone; every wrong option or file line is one clear message before anything is generated."""

from __future__ import annotations

import subprocess

import pytest
import torch

from astrai_ds.inference.engine import LLMEngine
from astrai_ds.inference.sampling import SamplingParams
from astrai_ds.model.io import load_model_folder
from conftest import (VENV_BIN, cli_in_process, expect_user_error, free_port, read_jsonl, run_cmd, run_distributed,
                      run_ranks, write_jsonl)

CLI = str(VENV_BIN / "astrai-ds")
PROMPT = "The capital of France is"
LONG = "hello world " * 200  # far past the test model's 128-token context


@pytest.fixture(scope="module")
def engine(model_dir):
    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    return LLMEngine(model, tokenizer)


def _generate(model_dir, *args: str, check: bool = True):
    return run_cmd([CLI, "generate", "--model", str(model_dir), "--dtype", "fp32", *args], check=check)


def _generate_here(model_dir, *args: str, capsys) -> subprocess.CompletedProcess:
    """`_generate` in this process (the same `main`, without a torch import per case)."""
    return cli_in_process(capsys, "generate", "--model", str(model_dir), "--dtype", "fp32", *args)


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_a_greedy_prompt_streams_the_engines_completion(model_dir, engine, chat):
    proc = _generate(model_dir, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "20",
                     *(["--chat"] if chat else []))
    prompt = [{"role": "user", "content": PROMPT}] if chat else PROMPT
    expected = engine.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0))
    assert proc.stdout == expected.text + "\n"
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"{expected.completion_tokens} tokens ({expected.prompt_tokens} in the prompt), "
                              f"finish: {expected.finish_reason}, "), summary
    assert "tokens/s" in summary and "first token after" in summary


def test_stop_cuts_the_text(model_dir, engine, capsys):
    greedy = SamplingParams(max_new_tokens=20, temperature=0)
    full = engine.generate(PROMPT, greedy).text
    cut = next(ch for ch in full[3:] if ch.isalpha())  # a character some way into the completion
    # repeated --stop and several values after one --stop both add stop strings
    proc = _generate_here(model_dir, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "20",
                          "--stop", "never seen", cut, "--stop", "nor this", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == full[:full.index(cut)] + "\n"
    assert "finish: stop" in proc.stderr


def test_a_batch_runs_in_order_with_per_request_fields(model_dir, engine, tmp_path, capsys):
    chat = [{"role": "user", "content": "你好"}]
    records = [{"prompt": PROMPT, "id": "a"},
               {"messages": chat, "max_new_tokens": 3},
               {"prompt": LONG, "id": "too long"},
               {"prompt": "1 + 1 =", "stop": ["never seen"], "seed": 3, "temperature": 0.8, "top_k": 5}]
    out = tmp_path / "results" / "out.jsonl"
    proc = _generate_here(model_dir, "--input", write_jsonl(tmp_path / "in.jsonl", records), "--output", str(out),
                          "--temperature", "0", "--max-new-tokens", "12", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "generate: 3/3 requests" in proc.stderr and "1 refused" in proc.stderr, proc.stderr
    results = read_jsonl(out)
    assert len(results) == 4
    for record, result in zip(records, results):
        assert {k: result[k] for k in record} == record  # the input record, fields added after it

    # each request as it runs alone in the engine: the command-line values are the defaults of a line
    defaults = {"max_new_tokens": 12, "temperature": 0.0}
    for i, prompt in ((0, PROMPT), (1, chat), (3, "1 + 1 =")):
        fields = {k: v for k, v in records[i].items() if k not in ("prompt", "messages", "id")}
        expected = engine.generate(prompt, SamplingParams(**{**defaults, **fields}))
        got = results[i]
        assert (got["completion"], got["finish_reason"], got["prompt_tokens"], got["completion_tokens"]) == \
               (expected.text, expected.finish_reason, expected.prompt_tokens, expected.completion_tokens), i
        assert "error" not in got
    assert results[1]["completion_tokens"] <= 3
    assert results[2]["finish_reason"] == "error" and results[2]["completion"] is None
    assert "context is 128 tokens" in results[2]["error"], results[2]
    assert not list(out.parent.glob(".*tmp*"))  # the temporary file was renamed


def test_chat_makes_each_prompt_a_user_message(model_dir, engine, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    proc = _generate_here(model_dir, "--input", write_jsonl(tmp_path / "in.jsonl", [{"prompt": "你好"}]),
                          "--output", str(out), "--chat", "--system", "Be brief.", "--temperature", "0",
                          "--max-new-tokens", "6", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"}]
    expected = engine.generate(messages, SamplingParams(max_new_tokens=6, temperature=0))
    assert read_jsonl(out)[0]["completion"] == expected.text


@pytest.mark.parametrize("lines, fragments", [
    (['{"prompt": "a"}', '{"prompt": "b"'], [":2:", "invalid JSON"]),
    (['{"prompt": "a"}', '["b"]'], [":2:", "not an object"]),
    (['{"prompt": "a", "max_tokens": 3}'], [":1:", "'max_tokens'", "max_new_tokens"]),
    (['{"prompt": "a"}', '', '{"prompt": "b", "temperature": -1}'], [":3:", "temperature", "got -1"]),
    (['{"id": 1}'], [":1:", "neither"]),
    (['{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}'], [":1:", "not both"]),
    (['{"messages": [{"role": "bot", "content": "b"}]}'], [":1:", "'messages'", "role 'bot'"]),
    (['{"prompt": "a"}', '{"prompt": "\\ud800 hi"}'], [":2:", "'prompt'", "lone surrogate"]),
    (['{"prompt": "a", "repetition_penalty": 1e-300, "temperature": 1}'], [":1:", "repetition_penalty", "1e-300"]),
    (['{"prompt": "a", "max_new_tokens": 0}'], [":1:", "max_new_tokens must be an integer > 0"]),
], ids=["json", "not-object", "unknown-field", "bad-value", "no-prompt", "both", "bad-messages", "lone-surrogate",
        "penalty-overflow", "nothing-to-generate"])
def test_a_wrong_line_stops_before_the_model_loads(tmp_path, lines, fragments, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    # no such model folder: the file is checked first, so that is never reached
    proc = _generate_here(tmp_path / "no_model", "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                          capsys=capsys)
    expect_user_error(proc, f"{src}{fragments[0]}", *fragments[1:])
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("args, fragments", [
    (["--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens 0", "max_new_tokens must be an integer > 0"]),
    (["--prompt", "hi", "--top-p", "1.5"], ["--top-p 1.5", "top_p must be in (0, 1]"]),
    (["--prompt", "hi", "--temperature", "-1"], ["--temperature -1", "temperature must be"]),
    (["--prompt", "hi", "--input", "in.jsonl"], ["--prompt", "--input", "not both"]),
    ([], ["--prompt", "--input", "found neither"]),
    (["--prompt", "hi", "--output", "out.jsonl"], ["--output", "give --input"]),
    (["--input", "in.jsonl"], ["--input needs --output"]),
    (["--input", "in.jsonl", "--output", "in.jsonl"], ["--output", "is the --input file"]),
    (["--prompt", "hi", "--tp", "2"], ["--tp 2", "deepspeed --num_gpus 2"]),
], ids=["max-new-tokens", "top-p", "temperature", "prompt-and-input", "neither", "output-alone", "input-alone",
        "output-is-input", "tp-without-launcher"])
def test_wrong_options_are_one_message(model_dir, tmp_path, args, fragments, capsys):
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n')
    args = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in args]
    expect_user_error(_generate_here(model_dir, *args, capsys=capsys), *fragments)
    assert (tmp_path / "in.jsonl").read_text() == '{"prompt": "a"}\n'


def test_a_prompt_longer_than_the_context_is_one_message(model_dir):
    proc = _generate(model_dir, "--prompt", LONG, check=False)  # the real process: exit 2, no traceback
    expect_user_error(proc, "the prompt is", "context is 128 tokens", "shorten the prompt")
    assert proc.stdout == ""


@pytest.mark.parametrize("args, fragments", [
    (["--prompt", "caf\udce9 \udcff"], ["--prompt holds bytes that are not UTF-8", "terminal's encoding"]),
    (["--prompt", "hi", "--chat", "--system", "\udcff"], ["--system holds bytes that are not UTF-8"]),
    (["--prompt", "hi", "--temperature", "1", "--repetition-penalty", "1e-300"],
     ["--repetition-penalty 1e-300", "repetition_penalty must be in [0.01, 100]"]),
], ids=["prompt-not-utf8", "system-not-utf8", "penalty-overflow"])
def test_text_and_values_are_checked_before_the_model_loads(tmp_path, args, fragments, capsys):
    """What the shell hands over as undecodable bytes (`$'caf\xe9'`), and a penalty that would overflow the
    logits: one line, before the (here missing) model folder is even looked at."""
    expect_user_error(_generate_here(tmp_path / "no_model", *args, capsys=capsys), *fragments)


def test_a_missing_model_folder_is_one_message(tmp_path, capsys):
    expect_user_error(_generate_here(tmp_path / "no_model", "--prompt", "hi", capsys=capsys),
                      "no_model is not a model folder", "astrai-ds export")


@pytest.mark.multiproc
def test_tp2_under_the_launcher_gives_what_one_process_gives(model_dir, engine, tmp_path):
    """Every rank of a tensor-parallel run steps the same requests; rank 0 alone prints and writes."""

    def launch(*args: str, launcher: bool = False):
        port = free_port()
        generate = ["generate", "--tp", "2", "--model", str(model_dir), "--dtype", "fp32", "--temperature", "0",
                    "--max-new-tokens", "12", *args]
        if launcher:  # as docs/serving.md runs it
            proc = run_distributed([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
                                    "--module", "astrai_ds", *generate], port, extra_env={"OMP_NUM_THREADS": "1"})
        else:  # the ranks started directly, as the launcher starts them
            proc = run_ranks("astrai_ds", generate, 2, port, extra_env={"OMP_NUM_THREADS": "1"}, module=True)
        assert not proc.shm_left, proc.shm_left
        return proc

    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    expected = engine.generate(PROMPT, greedy)
    proc = launch("--prompt", PROMPT, launcher=True)
    assert proc.stdout.count(expected.text) == 1, proc.stdout
    assert proc.stderr.count(f"{expected.completion_tokens} tokens ({expected.prompt_tokens} in the prompt)") == 1

    out = tmp_path / "out.jsonl"
    launch("--input", write_jsonl(tmp_path / "in.jsonl", [{"prompt": PROMPT}, {"prompt": "1 + 1 ="}]),
           "--output", str(out))
    assert [r["completion"] for r in read_jsonl(out)] == [expected.text, engine.generate("1 + 1 =", greedy).text]


def test_compile_streams_the_engines_completion(model_dir, engine, capsys):
    proc = _generate_here(model_dir, "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "20", "--compile",
                          capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert "compile: the decode steps compile on their first use" in proc.stderr
    assert "could not be compiled" not in proc.stderr
    assert proc.stdout == engine.generate(PROMPT, SamplingParams(max_new_tokens=20, temperature=0)).text + "\n"
