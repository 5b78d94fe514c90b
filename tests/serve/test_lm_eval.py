"""EleutherAI's lm-evaluation-harness against a real `astrai-ds serve`, as docs/lm_eval.md runs it: the task files
`astrai-ds corpus` writes, lm-eval's local-completions backend (token-id prompts; echo with logprobs for the
multiple-choice task), scores equal to `astrai-ds eval`'s on the same items, and each choice's log-likelihood equal
to the in-process one (fp32)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from astrai_ds.data.chat import render_response
from astrai_ds.data.corpus.lm_eval_tasks import CHAT_MAX_GEN_TOKS, write_task_files
from astrai_ds.data.prompts import prompt_messages
from astrai_ds.inference.evaluate import evaluate_chat, sequence_logprob
from astrai_ds.model.io import load_model_folder
from conftest import VENV_BIN, cli_in_process, env, read_jsonl, write_jsonl
from tests.serve.conftest import Server

N = 6  # items per task


@pytest.mark.multiproc
def test_lm_eval_scores_equal_astrai_ds_eval(workspace, long_model_dir, tmp_path, capsys):
    corpus = workspace / "corpus"
    pairs = read_jsonl(corpus / "dpo_eval.jsonl")[:N]
    chat = read_jsonl(corpus / "sft_eval.jsonl")[:N]
    model, tokenizer = load_model_folder(long_model_dir, dtype=torch.float32)
    # A random model answers no question right. For every other question its own greedy answer (capped as the task
    # caps it) becomes the accepted plain answer, so exact match is 0.5 by either path only if both generate alike.
    responses = []
    evaluate_chat(model, tokenizer, chat, max_new_tokens=CHAT_MAX_GEN_TOKS, responses=responses)
    for record, answer in zip(chat[::2], responses[::2]):
        record["answers"] = {**record["answers"], "plain": answer["response"].strip()}
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "sft_eval.jsonl", chat)
    write_jsonl(data / "dpo_eval.jsonl", pairs)
    tasks = write_task_files(data)  # what `astrai-ds corpus` writes beside its data

    server = Server(long_model_dir, tmp_path / "server.log")
    try:
        model_args = (f"model={long_model_dir.name},base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                      f"tokenizer={long_model_dir},max_length={model.cfg.max_seq_len},num_concurrent=2")
        proc = subprocess.run([str(VENV_BIN / "lm_eval"), "--model", "local-completions", "--model_args", model_args,
                               "--include_path", str(tasks), "--tasks", "astrai_pairs,astrai_chat",
                               "--apply_chat_template", "--output_path", str(tmp_path / "out"), "--log_samples"],
                              env={**env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                   "HF_HOME": str(tmp_path / "hf")},
                              capture_output=True, text=True, timeout=600)
    finally:
        assert server.stop() == 0, server.log()
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]

    ours = json.loads(cli_in_process(capsys, "eval", "--model", str(long_model_dir), "--dtype", "fp32",
                                     "--chat", str(data / "sft_eval.jsonl"), "--pairs", str(data / "dpo_eval.jsonl"),
                                     "--max-new-tokens", str(CHAT_MAX_GEN_TOKS)).stdout)
    assert results["astrai_chat"]["exact_match,none"] == ours["chat_response_match"] == 0.5
    assert results["astrai_pairs"]["acc,none"] == ours["pref_accuracy"]
    assert 0 < ours["pref_accuracy"] < 1  # (with these items: a check that tells the two choices apart)

    # lm-eval moves the context's trailing "\n" (after "assistant") into the continuation: it scores that token, then
    # the response and its <|im_end|>. The same split in process gives the same log-likelihood.
    samples = read_jsonl(next((tmp_path / "out").rglob("samples_astrai_pairs_*.jsonl")))
    assert sorted(s["doc_id"] for s in samples) == list(range(N))
    for sample in samples:
        record = pairs[sample["doc_id"]]
        for resp, response in zip(sample["resps"], (record["chosen"], record["rejected"])):
            ids, mask = render_response(tokenizer, prompt_messages(record), response)
            start = mask.index(1) - 1
            assert tokenizer.decode([ids[start]]) == "\n"
            assert float(resp[0][0]) == pytest.approx(sequence_logprob(model, ids[:start], ids[start:]), abs=1e-4)
