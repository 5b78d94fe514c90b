#!/usr/bin/env python
"""Serving speed: `astrai-ds serve` on the `small` model under 1, 4, 8 and 16 concurrent streaming clients on
loopback, against the same server with one stream at a time (the baseline every level is compared to).

The model is benchmarks/generate.py's: the `small` preset with random weights from a fixed seed, bf16 by default,
written once as a model folder. The server is a real `astrai-ds serve` process. Each client streams
`/v1/completions` requests one after another, each with its own random --prompt-len-token prompt (so no prefix is
reused) and exactly --new-tokens new tokens (`ignore_eos`, greedy). Per level:

  tokens/s   the sum of the clients' rates, each its generated tokens over its own first request sent to its
             last [DONE] (with every client starting at once: all tokens over the level's wall time)
  TTFT       median time from sending a request to its first event holding text or tokens

Aim (the serving issue): at 8 streams at least 4x the tokens/s of one stream, with median TTFT under 2x.

--arrival burst starts every client at once: their requests arrive together and, being alike, stay in step, so
every request's prefill shares its step with the others'. --arrival staggered spreads the clients' starts over
one request's time, so each request arrives while the others decode, as under a steady load.

    .venv/bin/python benchmarks/serve.py                          # small, bf16
    .venv/bin/python benchmarks/serve.py --model configs/model/tiny.json --new-tokens 16   # smoke test

Run it on a quiet machine: the server uses all cores.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import DTYPES, build_folder  # noqa: E402  (benchmarks/generate.py)

from astrai_ds.launch_env import free_port  # noqa: E402
from machine import announce, arg_parser  # noqa: E402  (benchmarks/machine.py)


def start_server(folder: Path, dtype: str, log_path: Path, *options: str):
    """(process, url, log file) of an `astrai-ds serve` process on `folder` and a free port, once it is healthy."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "astrai_ds", "serve", "--model", str(folder), "--dtype", dtype,
                               "--port", str(port), *options], stdout=log, stderr=subprocess.STDOUT)
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited {server.returncode}: see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url, log
        except httpx.TransportError:
            time.sleep(0.5)


def stop_server(server, log) -> None:
    """SIGTERM (the server drains and exits), then close its log."""
    server.send_signal(signal.SIGTERM)
    server.wait(120)
    log.close()


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], new_tokens: int) -> tuple[float, int]:
    """(TTFT, generated tokens) of one streamed completion."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif ttft is None:
                ttft = time.perf_counter() - t0
    return ttft, tokens


async def level(url: str, streams: int, requests_per_stream: int, prompt_len: int, new_tokens: int, vocab: int,
                seed: int, start_gap: float = 0.0) -> dict:
    rng = random.Random(seed)
    prompts = [[rng.randrange(16, vocab) for _ in range(prompt_len)] for _ in range(streams * requests_per_stream)]
    results, rates = [], []

    async def client_loop(i: int):
        await asyncio.sleep(i * start_gap)  # staggered: client i starts i gaps after the first
        async with httpx.AsyncClient(timeout=600) as client:
            start, mine = time.perf_counter(), []
            for k in range(requests_per_stream):
                mine.append(await one_request(client, url, prompts[i * requests_per_stream + k], new_tokens))
            rates.append(sum(n for _, n in mine) / (time.perf_counter() - start))
            results.extend(mine)

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(streams)))
    seconds = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    assert tokens == len(prompts) * new_tokens, (tokens, len(prompts), new_tokens)
    # The sum of the clients' own rates (each one's tokens over its own first send to last [DONE]): with every
    # client starting at once, the level's tokens over its wall time; with staggered clients, the same without
    # the ramp up and down, when fewer clients run.
    return {"streams": streams, "requests": len(prompts), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": sum(rates), "ttft_median_s": statistics.median(t for t, _ in results)}


def main() -> int:
    p = arg_parser(__doc__)
    p.add_argument("--model", type=Path, default=ROOT / "configs/model/small.json",
                   help="model config to build with random weights, or a model folder to load")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and activations")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16], help="concurrency levels")
    p.add_argument("--requests-per-stream", type=int, default=3, help="requests each client sends in turn")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the corpus, tokenizer and model folder here")
    p.add_argument("--arrival", choices=["burst", "staggered"], default="burst",
                   help="burst: every client starts at once (and, all requests being alike, they stay in step); "
                        "staggered: client i starts i x D/streams later, D being one request's time at the level's "
                        "expected speed (twice a lone request's for every concurrency: about the speed measured)")
    p.add_argument("--max-batched-tokens", type=int, default=None, metavar="N",
                   help="the server's --max-batched-tokens (default: its own)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    machine = announce(("fastapi", "uvicorn"))

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_serve_"))
    work.mkdir(parents=True, exist_ok=True)
    folder = build_folder(work, args.model, DTYPES[args.dtype])
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    budget = ["--max-batched-tokens", str(args.max_batched_tokens)] if args.max_batched_tokens else []
    server, url, log = start_server(folder, args.dtype, work / "server.log", "--max-running", str(max(args.streams)),
                                    *budget)
    try:
        asyncio.run(level(url, 2, 1, args.prompt_len, 8, vocab, seed=999))  # warm-up
        rows = []
        for n in args.streams:
            gap = 0.0
            if args.arrival == "staggered" and rows:  # one request takes about twice a lone one's time under load
                gap = 2 * rows[0]["seconds"] / rows[0]["requests"] / n
            rows.append(asyncio.run(level(url, n, args.requests_per_stream, args.prompt_len, args.new_tokens, vocab,
                                          seed=n, start_gap=gap)))
    finally:
        stop_server(server, log)

    base = rows[0]
    print(f"astrai-ds serve, {args.model.stem} {args.dtype}, {args.prompt_len}-token prompts, {args.new_tokens} new "
          f"tokens, {args.requests_per_stream} requests per stream, {args.arrival} arrivals, max batched tokens "
          f"{args.max_batched_tokens or 'default'}; torch threads = cores")
    print(f"{'streams':>8} {'requests':>9} {'tokens/s':>9} {'x 1 stream':>11} {'TTFT median':>12} {'x 1 stream':>11}")
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["ttft_ratio"] = r["ttft_median_s"] / base["ttft_median_s"]
        print(f"{r['streams']:>8} {r['requests']:>9} {r['tokens_per_s']:>9.1f} {r['speedup']:>10.2f}x "
              f"{r['ttft_median_s'] * 1000:>10.0f}ms {r['ttft_ratio']:>10.2f}x")
    if args.json:
        config = vars(args) | {"model": str(args.model), "work_dir": str(work), "json": str(args.json)}
        args.json.write_text(json.dumps({"machine": machine, "config": config, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
