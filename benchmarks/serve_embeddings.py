#!/usr/bin/env python
"""An embeddings request under load: how long the running streams pause while `astrai-ds serve` embeds a large
`/v1/embeddings` request beside them.

The server (a real `astrai-ds serve` process on benchmarks/generate.py's `small` model, as benchmarks/serve.py
starts it) runs --streams streaming completions (`ignore_eos`, greedy). Once every stream has produced tokens for
a while, one client sends a /v1/embeddings request of --inputs texts. The engine embeds it in slices of about 256
tokens between two generation steps, so the streams should keep receiving tokens meanwhile. Reported, in the same
run:

  pause during    the longest gap between two consecutive events of any stream while the embeddings request runs
  pause before    the same, over the second just before it, every stream decoding (the alternative: no embeddings
                  request)

Aim (the serving issue): under 16 streams, a 500-input embeddings request delays the streams' next token by less
than 0.5 s.

    .venv/bin/python benchmarks/serve_embeddings.py --dtype fp32
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import DTYPES, build_folder  # noqa: E402  (benchmarks/generate.py)
from machine import announce, arg_parser  # noqa: E402
from serve import start_server, stop_server  # noqa: E402  (benchmarks/serve.py)

ROOT = Path(__file__).resolve().parent.parent


async def stream(client: httpx.AsyncClient, url: str, prompt: str, new_tokens: int, stamps: list[float]) -> None:
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())


def longest_gap(stamps: list[float], start: float, end: float) -> float:
    """The longest time without an event inside [start, end] (its edges count as events)."""
    inside = [start] + [t for t in stamps if start < t < end] + [end]
    return max(b - a for a, b in zip(inside, inside[1:]))


async def run(url: str, streams: int, inputs: int, new_tokens: int) -> dict:
    stamps: list[list[float]] = [[] for _ in range(streams)]
    texts = [f"Passage {i}: the city of Vela exports glass and imports grain from the river towns."
             for i in range(inputs)]
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = [asyncio.create_task(stream(client, url, f"Story {i}: once upon a time", new_tokens, stamps[i]))
                 for i in range(streams)]
        while min(len(s) for s in stamps) < 20:  # every stream is decoding
            await asyncio.sleep(0.05)
        quiet = time.perf_counter()
        await asyncio.sleep(1.0)
        start = time.perf_counter()
        r = await client.post(f"{url}/v1/embeddings", json={"input": texts})
        end = time.perf_counter()
        r.raise_for_status()
        assert len(r.json()["data"]) == inputs
        await asyncio.gather(*tasks)
    length = end - start
    if any(s[-1] < end for s in stamps):
        raise SystemExit("a stream ended before the embeddings request did: raise --new-tokens")
    return {"streams": streams, "inputs": inputs, "embed_seconds": length,
            "pause_during_s": max(longest_gap(s, start, end) for s in stamps),
            "pause_before_s": max(longest_gap(s, quiet, start) for s in stamps)}


def main() -> int:
    p = arg_parser(__doc__)
    p.add_argument("--model", type=Path, default=ROOT / "configs/model/small.json",
                   help="model config to build with random weights, or a model folder to load")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--streams", type=int, default=16, help="streaming completions running meanwhile")
    p.add_argument("--inputs", type=int, default=500, help="texts in the embeddings request")
    p.add_argument("--new-tokens", type=int, default=400, help="tokens each stream generates")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the corpus, tokenizer and model folder here")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    machine = announce(("fastapi", "uvicorn"))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_serve_embed_"))
    work.mkdir(parents=True, exist_ok=True)
    folder = build_folder(work, args.model, DTYPES[args.dtype])
    server, url, log = start_server(folder, args.dtype, work / "server_embed.log", "--max-running", str(args.streams))
    try:
        result = asyncio.run(run(url, args.streams, args.inputs, args.new_tokens))
    finally:
        stop_server(server, log)
    print(f"astrai-ds serve, {args.model.stem} {args.dtype}: {args.streams} streams, one embeddings request of "
          f"{args.inputs} texts ({result['embed_seconds']:.2f} s)")
    print(f"  longest pause of a stream during the request: {result['pause_during_s'] * 1000:.0f} ms")
    print(f"  longest pause of a stream just before it:     {result['pause_before_s'] * 1000:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "config": {**vars(args), "model": str(args.model),
                                         "work_dir": str(work), "json": str(args.json)}, "result": result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
