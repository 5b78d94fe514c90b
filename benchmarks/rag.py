#!/usr/bin/env python
"""Retrieval speed: indexing throughput with the model's own embeddings, and query latency over 100,000 chunks
for faiss (exact inner product and HNSW) and bm25s, against a brute-force numpy search over the same vectors
(the seed's method: a matrix of vectors and a dot product per query), in one run.

  embedding   chunks of the built-in corpus (chunked with `rag.chunking`, --max-tokens tokens at most) embedded
              by `inference.embed.Embedder` on the `small` model (random weights: speed does not depend on them)
  search      --chunks chunks: the texts are corpus sentences drawn at random (for bm25s, over token ids), the
              vectors are the embedded chunks' vectors plus noise, normalised (embedding 100,000 chunks takes
              too long on a CPU for a benchmark; latency does not depend on where the vectors came from). Each
              method answers --queries queries for the top 10; median and 95th percentile latency per query,
              one query at a time. HNSW: recall@10 against the exact search, and its build time.

    .venv/bin/python benchmarks/rag.py                      # small, fp32, 100,000 chunks
    .venv/bin/python benchmarks/rag.py --model configs/model/tiny.json --chunks 5000 --embed 200   # smoke test
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import DTYPES, build_folder  # noqa: E402  (benchmarks/generate.py)
from machine import announce, arg_parser  # noqa: E402  (benchmarks/machine.py)


def latencies(fn, queries) -> tuple[float, float]:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main() -> int:
    p = arg_parser(__doc__)
    p.add_argument("--model", type=Path, default=ROOT / "configs/model/small.json", help="model config to build")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--embed", type=int, default=2000, help="chunks to embed for the indexing throughput")
    p.add_argument("--max-tokens", type=int, default=128, help="chunk size limit")
    p.add_argument("--chunks", type=int, default=100_000, help="chunks in the search benchmark")
    p.add_argument("--queries", type=int, default=200, help="queries per search method")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the corpus, tokenizer and model folder here")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    machine = announce(("faiss-cpu", "bm25s"))

    import bm25s
    import faiss

    from astrai_ds.model.io import load_model_folder
    from astrai_ds.rag.chunking import ChunkParams, chunk_document
    from astrai_ds.inference.embed import Embedder

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_rag_"))
    work.mkdir(parents=True, exist_ok=True)
    folder = build_folder(work, args.model, DTYPES[args.dtype])
    model, tokenizer = load_model_folder(folder, dtype=DTYPES[args.dtype])
    texts = [json.loads(line)["text"] for line in (work / "corpus" / "pretrain.jsonl").read_text().splitlines()]

    # ---- indexing throughput: chunk corpus documents, embed the chunks
    rng = random.Random(0)
    rng.shuffle(texts)
    chunks, t0 = [], time.perf_counter()
    for i, text in enumerate(texts):
        chunks += [c.text for c in chunk_document(text, f"doc{i}", tokenizer, ChunkParams(max_tokens=args.max_tokens),
                                                  markdown=False)]
        if len(chunks) >= args.embed:
            break
    chunks = chunks[:args.embed]
    chunk_s = time.perf_counter() - t0
    tokens = sum(len(tokenizer.encode(c)) + 1 for c in chunks)
    embedder = Embedder(model, tokenizer)
    embedder(chunks[:32])  # warm-up
    t0 = time.perf_counter()
    vectors = embedder(chunks)
    embed_s = time.perf_counter() - t0

    # ---- search over --chunks chunks
    sentences = [s.strip() for t in texts for s in t.replace("。", "。\n").replace(". ", ".\n").splitlines()
                 if s.strip()]
    big_texts = [" ".join(rng.choice(sentences) for _ in range(3)) for _ in range(args.chunks)]
    noise = np.random.default_rng(0)
    base = vectors[noise.integers(0, len(vectors), args.chunks)]
    big = base + noise.normal(0, 0.05, base.shape).astype(np.float32)
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    queries_v = (big[noise.integers(0, args.chunks, args.queries)]
                 + noise.normal(0, 0.05, (args.queries, big.shape[1])).astype(np.float32))
    queries_v /= np.linalg.norm(queries_v, axis=1, keepdims=True)
    queries_t = [[str(t) for t in tokenizer.encode(rng.choice(sentences))] for _ in range(args.queries)]

    rows = {}
    rows["numpy brute force"] = latencies(lambda q: np.argpartition(-(big @ q), 10)[:10], queries_v)
    flat = faiss.IndexFlatIP(big.shape[1])
    flat.add(big)
    rows["faiss flat (exact)"] = latencies(lambda q: flat.search(q[None], 10), queries_v)
    t0 = time.perf_counter()
    hnsw = faiss.IndexHNSWFlat(big.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch = 200, 128
    hnsw.add(big)
    hnsw_build = time.perf_counter() - t0
    rows["faiss HNSW"] = latencies(lambda q: hnsw.search(q[None], 10), queries_v)
    exact = flat.search(queries_v, 10)[1]
    approx = hnsw.search(queries_v, 10)[1]
    recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))
    t0 = time.perf_counter()
    bm25 = bm25s.BM25()
    bm25.index([[str(t) for t in ids] for ids in tokenizer.encode_batch(big_texts)], show_progress=False)
    bm25_build = time.perf_counter() - t0
    vocab = bm25.vocab_dict
    rows["bm25s"] = latencies(lambda q: bm25.retrieve([[t for t in q if t in vocab]], k=10, show_progress=False),
                              queries_t)

    print(f"rag: {args.model.stem} {args.dtype}; torch threads = cores")
    print(f"indexing: {len(chunks)} chunks ({tokens} tokens) chunked in {chunk_s:.1f}s, embedded in {embed_s:.1f}s: "
          f"{len(chunks) / embed_s:.1f} chunks/s, {tokens / embed_s:.0f} tokens/s")
    print(f"search over {args.chunks} chunks, top 10, {args.queries} queries one at a time "
          f"(HNSW built in {hnsw_build:.1f}s, recall@10 {recall:.3f}; bm25s indexed in {bm25_build:.1f}s):")
    base_median = rows["numpy brute force"][0]
    print(f"{'method':>20} {'median':>10} {'p95':>10} {'x numpy':>8}")
    for name, (median, p95) in rows.items():
        print(f"{name:>20} {median * 1000:>8.2f}ms {p95 * 1000:>8.2f}ms {base_median / median:>7.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine,
                                         "embed": {"chunks": len(chunks), "tokens": tokens, "seconds": embed_s},
                                         "search": {k: {"median_s": m, "p95_s": q} for k, (m, q) in rows.items()},
                                         "hnsw": {"build_s": hnsw_build, "recall_at_10": recall},
                                         "bm25_build_s": bm25_build}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
