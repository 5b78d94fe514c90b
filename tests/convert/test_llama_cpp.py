"""Our GGUF files in llama.cpp itself (its Python binding, built once per machine by scripts/llama_cpp.sh): it
tokenizes as we do and its greedy tokens are ours, for a model we trained, for SmolLM2 exported back out, and for
SmolLM2 after a fine-tuning run (the run's own export, with SmolLM2's tokenizer and template)."""

from __future__ import annotations

import json

import pytest
import torch

from astrai_ds.inference.engine import LLMEngine
from astrai_ds.inference.sampling import SamplingParams
from astrai_ds.model.io import load_model_folder
from conftest import cli_in_process, run_python, run_setup_script

PROMPTS = ["The capital of France is", "23 + 45 =", "星期一的后一天是", "Once upon a time", "def square(x):"]
CHATS = [[{"role": "user", "content": q}] for q in
         ("What is the capital of France?", "Name three colours.", "What is 12 + 30?", "Say hello in Chinese.",
          "Who wrote Hamlet?")]


@pytest.fixture(scope="module")
def llama_cpp():
    run_setup_script("llama_cpp.sh", "could not build or install llama-cpp-python", timeout=1800)
    import llama_cpp

    return llama_cpp


def _greedy_in_llama_cpp(llama_cpp, path, prompts_ids: list[list[int]], n: int, stops) -> list[list[int]]:
    """(the Llama, each prompt's greedy continuation in llama.cpp up to n tokens, cut before a stop token)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    outs = []
    for ids in prompts_ids:
        tokens = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stops or len(tokens) == n:
                break
            tokens.append(token)
        outs.append(tokens)
    return llm, outs


def _greedy_here(model_dir, prompts, n: int) -> list[list[int]]:
    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    engine = LLMEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=n, temperature=0)
    return [engine.encode(p) for p in prompts], [engine.generate(p, params).token_ids for p in prompts], tokenizer


@pytest.mark.multiproc  # slow: llama.cpp's build, once per machine (about 3.5 minutes)
@pytest.mark.llama_cpp
def test_llama_cpp_runs_our_trained_model_with_our_tokens(llama_cpp, trained, tmp_path, capsys):
    run = trained("zero2.json", 2)
    out = tmp_path / "tiny.gguf"
    assert cli_in_process(capsys, "export", "--run", str(run), "--format", "gguf", "--outtype", "f32",
                          "--out", str(out)).returncode == 0
    assert cli_in_process(capsys, "export", "--run", str(run), "--out", str(tmp_path / "model")).returncode == 0
    prompts, ours, tokenizer = _greedy_here(tmp_path / "model", PROMPTS, 16)
    llm, theirs = _greedy_in_llama_cpp(llama_cpp, out, prompts, 16, tokenizer.stop_ids)
    for text, ids in zip(PROMPTS, prompts):
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids, text
    stops = tokenizer.stop_ids
    assert [[t for t in o if t not in stops] for o in ours] == theirs


@pytest.mark.multiproc  # slow: llama.cpp's build, and a real model
@pytest.mark.llama_cpp
def test_llama_cpp_runs_smollm2_as_we_export_it(llama_cpp, smollm2_dir, tmp_path, capsys):
    out = tmp_path / "smollm2.gguf"
    assert cli_in_process(capsys, "export", "--model", str(smollm2_dir), "--format", "gguf", "--outtype", "f32",
                          "--out", str(out)).returncode == 0
    prompts, ours, tokenizer = _greedy_here(smollm2_dir, CHATS, 12)
    llm, theirs = _greedy_in_llama_cpp(llama_cpp, out, prompts, 12, tokenizer.stop_ids)
    stops = tokenizer.stop_ids
    assert [[t for t in o if t not in stops] for o in ours] == theirs
    assert "Paris" in tokenizer.decode(theirs[0])


@pytest.mark.multiproc  # slow: llama.cpp's build, and a fine-tuning run of a real model
@pytest.mark.llama_cpp
def test_llama_cpp_runs_smollm2_after_fine_tuning(llama_cpp, smollm2_dir, workspace, tmp_path, capsys):
    """Two SFT steps of SmolLM2 on the corpus's reading conversations (rendered with its own template), then
    `export --run --format gguf`: llama.cpp's greedy tokens are those of the run's exported folder in our engine."""
    reading = (workspace / "corpus" / "reading.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (tmp_path / "reading.jsonl").write_text("\n".join(reading) + "\n", encoding="utf-8")
    assert cli_in_process(capsys, "prepare", "--stage", "sft", "--input", str(tmp_path / "reading.jsonl"),
                          "--tokenizer", str(smollm2_dir), "--out", str(tmp_path / "data"), "--seq-len", "256"
                          ).returncode == 0
    config = tmp_path / "train.json"
    config.write_text(json.dumps({
        "model": None, "tokenizer": str(smollm2_dir), "output_dir": str(tmp_path / "run"),
        "data": {"path": str(tmp_path / "data"), "seq_len": 256},
        "stage": {"type": "sft", "init_from": str(smollm2_dir)},
        "max_steps": 2, "micro_batch_size": 1, "save_interval": 2, "log_interval": 1, "eval_interval": 100,
        "precision": "fp32", "optimizer": {"lr": 1e-4}, "schedule": {"warmup_steps": 1}}))
    run_python("train.py", ["--config", str(config), "--ds_config", "zero2.json"])
    out = tmp_path / "tuned.gguf"
    for args in (["--out", str(tmp_path / "tuned")], ["--format", "gguf", "--outtype", "f32", "--out", str(out)]):
        assert cli_in_process(capsys, "export", "--run", str(tmp_path / "run"), *args).returncode == 0
    prompts, ours, tokenizer = _greedy_here(tmp_path / "tuned", CHATS, 12)
    base = _greedy_here(smollm2_dir, CHATS, 12)[1]
    llm, theirs = _greedy_in_llama_cpp(llama_cpp, out, prompts, 12, tokenizer.stop_ids)
    stops = tokenizer.stop_ids
    assert [[t for t in o if t not in stops] for o in ours] == theirs
    assert ours != base  # the fine-tuning changed what the model says
