"""Tokenize a pretraining corpus into flat token shards (`astrai-ds prepare` for the "pt" stage).

Every document is stored as [bos] + tokens + [eos]. Bad records are skipped and counted by reason in the
summary and in index.json, never dropped silently.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
from collections import Counter, deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from astrai_ds.data.shards import ShardWriter, remove_shards
from astrai_ds.data.sources import expand_inputs, iter_texts
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import DataError

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    # Each worker is one process already; the tokenizer's own thread pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode_docs(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch as one flat array of [bos] + tokens + [eos] documents and their lengths; numpy arrays
    pickle far faster than lists of lists on the way back from a worker."""
    encoded = tok.encode_batch(texts)
    lengths = np.fromiter((len(ids) + 2 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain((tok.bos_id,), ids, (tok.eos_id,)) for ids in encoded),
        dtype=np.int64, count=int(lengths.sum()),
    )
    return flat, lengths


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _encode_docs(_worker_tokenizer, texts)


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _encoded_batches(batches: Iterator[list[str]], tok: Tokenizer, workers: int):
    """Encoded batches in input order. With a pool, at most 4 batches per worker are in flight: Pool.imap
    would read the whole corpus into its task queue ahead of the workers (it has no backpressure)."""
    if workers == 1:
        for batch in batches:
            yield len(batch), _encode_docs(tok, batch)
        return
    # fork where the platform has it: spawn re-runs the caller's __main__ in every worker, which fails for
    # `python -` or a notebook and recurses in a script without a main guard. The parent has not used the
    # tokenizer's thread pool here, and the children only tokenize.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (str(tok.path),)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((len(batch), pool.apply_async(_encode_in_worker, (batch,))))
            if len(pending) >= 4 * workers:
                n, result = pending.popleft()
                yield n, result.get()
        while pending:
            n, result = pending.popleft()
            yield n, result.get()


def prepare_pretrain(inputs: list, tokenizer_path, out_dir, seq_len: int, workers: int | None = None,
                     batch_size: int = 1000, progress: bool = True) -> dict:
    """Tokenize `.txt` (a line is a document) and `.jsonl` (field `text`) files into shards under `out_dir`.

    Returns a summary: documents, tokens, shards, training windows of `seq_len`, skipped records by reason.
    An existing shard folder at `out_dir` is replaced."""
    from tqdm import tqdm

    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    files = expand_inputs(inputs)
    tok = Tokenizer.load(tokenizer_path)
    out = Path(out_dir)
    remove_shards(out)

    start = time.time()
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    texts = itertools.chain.from_iterable(iter_texts(p, skipped, examples) for p in files)
    meta = {
        "stage": "pt",
        "tokenizer_hash": tok.hash,
        "vocab_size": tok.vocab_size,
        "seq_len": seq_len,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "inputs": [str(p) for p in files],
        "skipped": {},  # filled in below, once every file has been read
        "skipped_examples": {},
    }
    writer = ShardWriter(out, tok.vocab_size, meta)
    bar = tqdm(desc="prepare", unit="doc", disable=not progress)
    try:
        for n, (flat, lengths) in _encoded_batches(_batches(texts, batch_size), tok, workers):
            for doc in np.split(flat, np.cumsum(lengths)[:-1]):
                writer.add(doc)
            bar.update(n)
    except BaseException:
        writer.abort()
        remove_shards(out)
        raise
    finally:
        bar.close()
    skipped_note = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none"
    if writer.num_documents == 0:
        writer.abort()
        remove_shards(out)
        raise DataError(
            f"empty corpus: no documents in {', '.join(map(str, files))} (skipped records: {skipped_note})"
        )
    writer.meta["skipped"] = dict(sorted(skipped.items()))
    writer.meta["skipped_examples"] = dict(sorted(examples.items()))
    index = writer.close()
    num_samples = max(0, (index["num_tokens"] - 1) // seq_len)
    summary = {
        "out_dir": str(out),
        "num_documents": index["num_documents"],
        "num_tokens": index["num_tokens"],
        "num_shards": len(index["shards"]),
        "num_samples": num_samples,
        "dtype": index["dtype"],
        "tokenizer_hash": tok.hash,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "seconds": round(time.time() - start, 3),
        "warnings": [],
    }
    if num_samples == 0:
        summary["warnings"].append(
            f"{index['num_tokens']} tokens are too few for one training window of seq_len {seq_len} "
            f"(needs {seq_len + 1}); add data or lower seq_len"
        )
    return summary
