"""`astrai-ds serve --tp 2` under the real `deepspeed` launcher (2 CPU ranks): rank 0 serves HTTP, both ranks step
the sharded engine together, the answers equal the unsharded engine's (greedy, fp32), and SIGTERM drains and
stops every rank."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx2 as httpx
import numpy as np
import openai
import psutil
import pytest

from astrai_ds.inference.sampling import SamplingParams
from conftest import ROOT, VENV_BIN, env, free_port, remove_shm_buffers

CHAT = [{"role": "user", "content": "介绍一下你自己。"}]


@pytest.mark.multiproc
def test_tp2_serves_the_unsharded_answers_and_stops_on_sigterm(model_dir, engine, tmp_path):
    master, port = free_port(), free_port()
    log = open(tmp_path / "launcher.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(master), "--module",
                             "astrai_ds", "serve", "--model", str(model_dir), "--dtype", "fp32", "--tp", "2",
                             "--port", str(port), "--seed", "0"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**env(), "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "launcher.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=model_dir.name, messages=CHAT, max_tokens=20, temperature=0)
        assert r.choices[0].message.content == engine.generate(CHAT, SamplingParams(max_new_tokens=20,
                                                                                    temperature=0)).text
        streamed = client.completions.create(model=model_dir.name, prompt=["Hello", "北京"], max_tokens=12,
                                             temperature=0, stream=True)
        texts = ["", ""]
        for chunk in streamed:
            for c in chunk.choices:
                texts[c.index] += c.text
        assert texts == [engine.generate(p, SamplingParams(max_new_tokens=12, temperature=0)).text
                         for p in ("Hello", "北京")]

        # embeddings run on every rank (the sharded model) and equal the unsharded ones
        from astrai_ds.inference.embed import Embedder

        got = client.embeddings.create(model=model_dir.name, input=["Hello", "北京"], encoding_format="float")
        expected = Embedder(engine.model, engine.tokenizer)(["Hello", "北京"])
        np.testing.assert_allclose([d.embedding for d in got.data], expected, atol=1e-5)

        # prompt log-probs (lm-eval's log-likelihood request) are computed in the sharded engine's steps too
        ids = engine.encode("Hello world")
        scored = client.completions.create(model=model_dir.name, prompt=ids, max_tokens=1, logprobs=1, echo=True,
                                           temperature=0).choices[0].logprobs.token_logprobs
        alone = engine.generate(ids, SamplingParams(max_new_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1))
        assert scored[0] is None and scored[1:] == pytest.approx(
            [e["logprob"] for e in alone.prompt_logprobs[1:] + alone.logprobs], abs=1e-5)

        # DeepSpeed's runner does not forward signals; its launch.py child sends SIGTERM to each rank in turn.
        launch = [p for p in psutil.Process(proc.pid).children() if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        assert len(launch) == 1
        ranks = launch[0].children()
        launch[0].send_signal(signal.SIGTERM)
        gone, alive = psutil.wait_procs(ranks, timeout=60)
        assert not alive, (tmp_path / "launcher.log").read_text()
        text = (tmp_path / "launcher.log").read_text()
        assert "SIGTERM: draining" in text and "Traceback" not in text, text
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            p.kill()
        proc.kill()
        proc.wait()
        log.close()
        remove_shm_buffers(master)
