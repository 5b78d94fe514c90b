"""Tokenize training data into token shards (`astrai-ds prepare --stage pt|sft|dpo`).

- pt: every document is stored as [bos] + tokens + [eos], one flat stream;
- sft: every conversation is one document, rendered with ChatML (`chat.render_chat`), with its loss mask
  (1 on assistant tokens and their <|im_end|>);
- dpo: every pair is two consecutive documents, prompt + chosen and prompt + rejected
  (`chat.render_response`), with masks that are 1 on the response and its <|im_end|>.

Bad records are skipped and counted by reason in the summary and in index.json (with a few "file:line"
examples per reason), never dropped silently.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import time
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from astrai_ds.data import chat
from astrai_ds.data.shards import INDEX_FILE, ShardWriter, remove_shards
from astrai_ds.data.sources import check_out_dir, count_skip, expand_inputs, iter_records, iter_texts
from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import DataError

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    # Ctrl-C signals the whole process group: the parent stops the pool; a worker that took it too would
    # print a traceback, and one killed inside a task can leave the pool waiting for its result forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Each worker is one process already; the tokenizer's own thread pool would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = Tokenizer.load(tokenizer_path)


def _encode_docs(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch as one flat array of [bos] + tokens + [eos] documents (no bos where the model has none) and
    their lengths; numpy arrays pickle far faster than lists of lists on the way back from a worker."""
    encoded = tok.encode_batch(texts)
    extra = len(tok.prefix_ids) + 1
    lengths = np.fromiter((len(ids) + extra for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(tok.prefix_ids, ids, (tok.eos_id,)) for ids in encoded),
        dtype=np.int64, count=int(lengths.sum()),
    )
    return flat, lengths


def _in_worker(fn, work):
    return fn(_worker_tokenizer, work)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _map_batches(fn, batches: Iterator[tuple], tok: Tokenizer, workers: int):
    """(context, fn(tok, work)) for every (context, work) of `batches`, in input order; `fn` is a module-level
    function (workers receive it by name). With a pool, at most 4 batches per worker are in flight:
    Pool.imap would read the whole corpus into its task queue ahead of the workers (no backpressure)."""
    if workers == 1:
        for context, work in batches:
            yield context, fn(tok, work)
        return
    # fork where the platform has it: spawn re-runs the caller's __main__ in every worker, which fails for
    # `python -` or a notebook and recurses in a script without a main guard. The parent has not used the
    # tokenizer's thread pool here, and the children only tokenize.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (str(tok.path),)) as pool:
        pending: deque = deque()
        for context, work in batches:
            pending.append((context, pool.apply_async(_in_worker, (fn, work))))
            if len(pending) >= 4 * workers:
                context, result = pending.popleft()
                yield context, result.get()
        while pending:
            context, result = pending.popleft()
            yield context, result.get()


def _check_args(seq_len, workers) -> int:
    """The number of workers to use, after checking seq_len and workers."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    workers = min(os.cpu_count() or 1, 4) if workers is None else workers
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")
    return workers


def _held(out: Path) -> str:
    """What the prepared data in `out` is, from its index.json, for a message."""
    try:
        index = json.loads((out / INDEX_FILE).read_text(encoding="utf-8"))
        return (f"stage {index.get('stage', 'pt')} shards: {index['num_documents']} documents, "
                f"{index['num_tokens']} tokens")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"prepared data: it has an {INDEX_FILE}"


def _start(inputs: list, tokenizer_path, out_dir, seq_len, workers,
           overwrite: bool) -> tuple[int, list[Path], Tokenizer, Path]:
    """Check the arguments, list the input files, load the tokenizer and clear `out_dir` of old shards:
    (workers, files, tokenizer, out). Prepared data already in `out_dir` is only replaced with `overwrite`."""
    workers = _check_args(seq_len, workers)
    out = check_out_dir(out_dir, "the token shards")
    if (out / INDEX_FILE).exists() and not overwrite:
        raise DataError(f"{out} already holds {_held(out)}; give --out a new folder, or add --overwrite to "
                        f"replace that data")
    files = expand_inputs(inputs)
    tok = Tokenizer.load(tokenizer_path)
    remove_shards(out)
    return workers, files, tok, out


def _meta(stage: str, tok: Tokenizer, seq_len: int, files: list[Path], **token_ids) -> dict:
    """The index metadata every stage records; `skipped` is filled in once every file has been read."""
    return {"stage": stage, "tokenizer_hash": tok.hash, "vocab_size": tok.vocab_size, "seq_len": seq_len,
            "bos_id": tok.bos_id, "eos_id": tok.eos_id, **token_ids, "inputs": [str(p) for p in files],
            "skipped": {}, "skipped_examples": {}}


@contextmanager
def _writing(writer: ShardWriter, out: Path):
    """Whatever interrupts the writing (an error, Ctrl-C) leaves no half-written shard folder behind."""
    try:
        yield
    except BaseException:
        writer.abort()
        remove_shards(out)
        raise


def _skipped_note(skipped: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none"


def _close(writer: ShardWriter, out: Path, skipped: Counter, examples: dict, empty_error: str | None) -> dict:
    """Record the skipped records and write the index; with `empty_error` (nothing usable was read), remove
    the shards instead and raise it."""
    if empty_error:
        writer.abort()
        remove_shards(out)
        raise DataError(empty_error)
    writer.meta["skipped"] = dict(sorted(skipped.items()))
    writer.meta["skipped_examples"] = dict(sorted(examples.items()))
    return writer.close()


def prepare_pretrain(inputs: list, tokenizer_path, out_dir, seq_len: int, workers: int | None = None,
                     batch_size: int = 1000, progress: bool = True, overwrite: bool = False) -> dict:
    """Tokenize `.txt` (a line is a document) and `.jsonl` (field `text`) files into shards under `out_dir`.

    Returns a summary: documents, tokens, shards, training windows of `seq_len`, skipped records by reason.
    Prepared data already in `out_dir` is refused (DataError), or replaced with `overwrite`."""
    from tqdm import tqdm

    workers, files, tok, out = _start(inputs, tokenizer_path, out_dir, seq_len, workers, overwrite)
    start = time.time()
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    texts = itertools.chain.from_iterable(iter_texts(p, skipped, examples) for p in files)
    writer = ShardWriter(out, tok.vocab_size, _meta("pt", tok, seq_len, files))
    with _writing(writer, out), tqdm(desc="prepare", unit="doc", disable=not progress) as bar:
        batches = ((len(batch), batch) for batch in _batches(texts, batch_size))
        for n, (flat, lengths) in _map_batches(_encode_docs, batches, tok, workers):
            for doc in np.split(flat, np.cumsum(lengths)[:-1]):
                writer.add(doc)
            bar.update(n)
    empty_error = (f"empty corpus: no documents in {', '.join(map(str, files))} (skipped records: "
                   f"{_skipped_note(skipped)})") if writer.num_documents == 0 else None
    index = _close(writer, out, skipped, examples, empty_error)
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


# ---------------------------------------------------------------- chat stages: sft and dpo


def _flatten(docs: list[tuple[list[int], list[int]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int64, mask uint8, lengths) of rendered documents, flat: cheap to send back from a worker."""
    lengths = np.fromiter((len(ids) for ids, _ in docs), dtype=np.int64, count=len(docs))
    n = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(d[0] for d in docs), dtype=np.int64, count=n)
    mask = np.fromiter(itertools.chain.from_iterable(d[1] for d in docs), dtype=np.uint8, count=n)
    return ids, mask, lengths


def _render_conversations(tok: Tokenizer, conversations: list[list[dict]]):
    return _flatten([chat.render_chat(tok, messages) for messages in conversations])


def _render_pairs(tok: Tokenizer, pairs: list[tuple[list[dict], str, str]]):
    """Two documents per pair: prompt + chosen, then prompt + rejected."""
    return _flatten([chat.render_response(tok, prompt, response)
                     for prompt, chosen, rejected in pairs for response in (chosen, rejected)])


def _chat_records(files: list[Path], normalize, skipped: Counter, examples: dict) -> Iterator[tuple[str, object]]:
    """("file:line", normalized record) of every good record; a bad one is counted with its reason."""
    for path in files:
        for lineno, value in iter_records(path, skipped, examples):
            where = f"{path}:{lineno}"
            try:
                yield where, normalize(value)
            except chat.ChatError as e:
                count_skip(skipped, examples, e.reason, f"{where} ({e})")


def _too_long(stage: str, docs: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> str | None:
    """Why a record's rendered documents do not fit seq_len, or None. A training sample holds seq_len + 1
    tokens (seq_len inputs and their targets)."""
    longest = max(len(ids) for ids, _ in docs)
    if stage == "sft":
        # Longer conversations are cut (or dropped) at training; one whose first trained token lies beyond
        # the cut has nothing to learn from.
        if not docs[0][1][:seq_len + 1].any():
            return f"the prompt fills seq_len {seq_len}: {longest} tokens in all"
        return None
    if longest > seq_len + 1:
        return f"prompt + longer response: {longest} tokens, seq_len {seq_len} holds {seq_len + 1}"
    return None


def _prepare_chat(stage: str, inputs: list, tokenizer_path, out_dir, seq_len: int, workers: int | None,
                  batch_size: int, progress: bool, overwrite: bool) -> dict:
    from tqdm import tqdm

    workers, files, tok, out = _start(inputs, tokenizer_path, out_dir, seq_len, workers, overwrite)
    start = time.time()
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    normalize, render = (chat.normalize_record, _render_conversations) if stage == "sft" else \
        (chat.normalize_pair, _render_pairs)
    records = _chat_records(files, normalize, skipped, examples)
    batches = (tuple(zip(*batch)) for batch in _batches(records, batch_size))  # (wheres, payloads)
    meta = _meta(stage, tok, seq_len, files, pad_id=tok.pad_id, im_start_id=tok.im_start_id,
                 im_end_id=tok.im_end_id)
    writer = ShardWriter(out, tok.vocab_size, meta, masks=True)
    records_done = overlong = trained = 0
    per_record = 1 if stage == "sft" else 2  # documents per record
    with _writing(writer, out), tqdm(desc=f"prepare {stage}", unit="record", disable=not progress) as bar:
        for wheres, (ids, mask, lengths) in _map_batches(render, batches, tok, workers):
            ends = np.cumsum(lengths).tolist()
            docs = [(ids[e - n:e], mask[e - n:e]) for e, n in zip(ends, lengths.tolist())]
            for i, where in enumerate(wheres):
                group = docs[i * per_record:(i + 1) * per_record]
                why = _too_long(stage, group, seq_len)
                if why:
                    count_skip(skipped, examples, "too_long", f"{where} ({why})")
                    continue
                overlong += len(group[0][0]) > seq_len + 1  # sft only: dpo skipped those above
                for doc_ids, doc_mask in group:
                    writer.add(doc_ids, doc_mask)
                    trained += int(doc_mask.sum())
                records_done += 1
            bar.update(len(wheres))
    what = "conversations" if stage == "sft" else "preference pairs"
    count_key = "num_conversations" if stage == "sft" else "num_pairs"
    writer.meta[count_key] = records_done
    if stage == "sft":
        writer.meta["num_overlong"] = overlong
    empty_error = (f"no usable {what} in {', '.join(map(str, files))} (skipped records: {_skipped_note(skipped)}); "
                   f"see `astrai-ds prepare --help` for the record format") if records_done == 0 else None
    index = _close(writer, out, skipped, examples, empty_error)
    summary = {
        "out_dir": str(out),
        "stage": stage,
        count_key: records_done,
        "num_documents": index["num_documents"],
        "num_tokens": index["num_tokens"],
        "num_trained_tokens": trained,
        "num_shards": len(index["shards"]),
        "dtype": index["dtype"],
        "tokenizer_hash": tok.hash,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": dict(sorted(examples.items())),
        "skip_reasons": {k: chat.SKIP_REASONS[k] for k in sorted(skipped)},
        "seconds": round(time.time() - start, 3),
        "warnings": [],
    }
    if stage == "sft":
        summary["num_overlong"] = overlong
        if overlong:
            summary["warnings"].append(
                f"{overlong} of {records_done} conversations are longer than seq_len {seq_len} (+1 target token): "
                f"training truncates or drops them (data.overlong)")
    return summary


def prepare_sft(inputs: list, tokenizer_path, out_dir, seq_len: int, workers: int | None = None,
                batch_size: int = 500, progress: bool = True, overwrite: bool = False) -> dict:
    """Render SFT conversations (.jsonl: {"messages": [{"role", "content"}, ...]} or {"prompt", "response"},
    optionally "system") into masked shards under `out_dir`, one document per conversation.

    Returns a summary: conversations, tokens, trained tokens, conversations longer than seq_len (kept:
    training truncates or drops them), skipped records by reason. Prepared data already in `out_dir` is
    refused, or replaced with `overwrite`."""
    return _prepare_chat("sft", inputs, tokenizer_path, out_dir, seq_len, workers, batch_size, progress, overwrite)


def prepare_dpo(inputs: list, tokenizer_path, out_dir, seq_len: int, workers: int | None = None,
                batch_size: int = 500, progress: bool = True, overwrite: bool = False) -> dict:
    """Render DPO pairs (.jsonl: {"prompt": str or messages, "chosen", "rejected"}, or "messages" for the
    prompt) into masked shards under `out_dir`: pair i is documents 2i (chosen) and 2i + 1 (rejected).

    A pair whose prompt plus longer response exceeds seq_len is skipped as too_long. Returns a summary like
    prepare_sft's, with num_pairs."""
    return _prepare_chat("dpo", inputs, tokenizer_path, out_dir, seq_len, workers, batch_size, progress, overwrite)
