"""Retrieval-augmented generation over your own documents, with the model's own embeddings.

  rag index   chunk and embed documents (.md, .txt, .jsonl with a "text" field; files or folders, each file
              once however often it is named) into an index folder; run it again after editing the documents:
              only changed files are embedded again, and chunks of deleted files go. Under `deepspeed
              --num_gpus N --module astrai_ds rag index ...` the N ranks share the embedding and rank 0
              writes the index
  rag query   the chunks closest to a question, with their source, heading path and score
  rag ask     retrieve, put the chunks in the prompt (as many as the context holds, best first), stream the
              answer, then list the sources it was given
  rag eval    measure on documents with known questions (the corpus's documents_eval.jsonl, indexed first):
              recall at k for each mode, and answers closed-book, with retrieved chunks and with the chunk
              that states the answer (the oracle), scored twice: exact (the answer first) and contained (the
              answer anywhere in the response); for all questions and for each language apart

Retrieval modes: dense (faiss over the embeddings), bm25 (bm25s over the model's tokens) and hybrid (both, fused
by reciprocal rank)."""

from __future__ import annotations

import sys
from pathlib import Path

from astrai_ds.errors import UserError

NAME = "rag"
HELP = "retrieval-augmented generation: index documents, query the index, ask with retrieved context"


def add_arguments(p) -> None:
    from astrai_ds.cli.model_commands import add_compile_argument, add_model_arguments
    from astrai_ds.cli.main import HelpFormatter
    from astrai_ds.inference.embed import POOLINGS
    from astrai_ds.rag.index import DENSE_KINDS, MODES

    sub = p.add_subparsers(dest="rag_command", metavar="ACTION", required=True)
    index = sub.add_parser("index", help="chunk and embed documents into an index folder",
                           formatter_class=HelpFormatter)
    index.add_argument("--docs", nargs="+", required=True, metavar="PATH", help="files or folders of documents")
    add_model_arguments(index)
    index.add_argument("--out", required=True, metavar="INDEX", help="the index folder (created or updated)")
    index.add_argument("--max-tokens", type=int, default=None, metavar="N",
                       help="no chunk is longer, in tokens (default: 256, or a quarter of a shorter context, so that "
                            "`rag ask` fits several chunks)")
    index.add_argument("--semantic", action="store_true",
                       help="also break sections where the meaning changes (embeds sentence groups: slower)")
    index.add_argument("--no-semantic", dest="semantic", action="store_false", help="structure and length only")
    index.add_argument("--pooling", choices=POOLINGS, default="mean", help="how token states become one vector")
    index.add_argument("--dense", choices=DENSE_KINDS, default="auto",
                       help="faiss index: flat (exact), hnsw (approximate), auto (hnsw from 50,000 chunks)")

    def add_search(q) -> None:
        q.add_argument("--index", required=True, metavar="INDEX", help="an index folder from `rag index`")
        q.add_argument("--question", required=True, metavar="TEXT")
        q.add_argument("-k", type=int, default=5, help="chunks to retrieve")
        q.add_argument("--mode", choices=MODES, default="hybrid", help="dense, bm25, or both fused")

    query = sub.add_parser("query", help="the chunks closest to a question", formatter_class=HelpFormatter)
    add_search(query)
    query.add_argument("--model", default=None, help="model folder (default: the one the index was built with)")
    query.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="weights")
    ask = sub.add_parser("ask", help="answer a question from retrieved chunks", formatter_class=HelpFormatter)
    add_search(ask)
    add_model_arguments(ask)
    ask.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                     help="answer length at most (default: 256, or a quarter of a shorter context)")
    ask.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 is greedy")
    add_compile_argument(ask)
    ev = sub.add_parser("eval", help="recall and exact answers on documents with known questions",
                        formatter_class=HelpFormatter)
    ev.add_argument("--index", required=True, metavar="INDEX", help="an index built from --docs")
    ev.add_argument("--docs", required=True, metavar="FILE",
                    help=".jsonl of documents with 'text' and 'qa': [{question, answer}] (documents_eval.jsonl)")
    add_model_arguments(ev)
    ev.add_argument("-k", type=int, default=5, help="recall at k")
    ev.add_argument("--answer-k", type=int, default=3, metavar="N",
                    help="retrieved chunks in the prompt of the RAG answers (fewer when the context is full)")
    ev.add_argument("--mode", choices=MODES, default="hybrid", help="retrieval mode of the RAG answers")
    ev.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="answer length at most")
    add_compile_argument(ev)
    ev.add_argument("--out", default=None, metavar="FILE", help="write the metrics as JSON")
    ev.add_argument("--responses", default=None, metavar="FILE",
                    help="write every question with its three answers as JSON lines")


def _load(model_dir, dtype_name: str, device: str | None = None):
    import torch

    from astrai_ds.cli.model_commands import model_dtype
    from astrai_ds.model.io import load_model_folder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model_folder(model_dir, dtype=model_dtype(dtype_name), device=device)


def _data_parallel():
    """(rank, world_size, all_gather_object) under a launcher with several ranks, else None."""
    from astrai_ds.launch_env import launched, world_size

    if not launched() or (world_size() or 1) < 2:
        return None
    import torch.distributed as dist

    from astrai_ds.inference.ds_inference import init_inference_distributed

    rank, world = init_inference_distributed()

    def gather(obj):
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out

    return rank, world, gather


def _device() -> str:
    import os

    import torch

    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def run(args) -> int:
    return {"index": _index, "query": _query, "ask": _ask, "eval": _eval}[args.rag_command](args)


def _index(args) -> int:
    from astrai_ds.model.io import read_model_config
    from astrai_ds.rag.chunking import ChunkParams
    from astrai_ds.rag.documents import read_documents
    from astrai_ds.rag.index import build_index

    context = read_model_config(args.model).max_seq_len
    params = ChunkParams(max_tokens=args.max_tokens or min(256, context // 4), semantic=args.semantic)
    docs, skipped = read_documents(args.docs)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not docs:
        raise UserError(f"--docs {' '.join(args.docs)}: no documents to index (.md, .markdown, .txt, or .jsonl with "
                        f"a 'text' field)")
    shard = _data_parallel()
    model, tokenizer = _load(args.model, args.dtype, device=_device() if shard else None)
    meta = build_index(docs, args.model, args.out, model, tokenizer, params, args.pooling, args.dense, shard=shard)
    if shard is not None:
        from astrai_ds.inference.ds_inference import close_distributed

        close_distributed()
        if shard[0] != 0:
            return 0
    counts = meta["counts"]
    print(f"{counts['documents']} documents, {counts['chunks']} chunks ({counts['tokens']} tokens; "
          f"{counts['embedded']} embedded, {counts['reused']} reused), {meta['dense']} dense index -> {args.out}",
          file=sys.stderr)
    return 0


def _open(args, model_dir):
    from astrai_ds.inference.embed import Embedder
    from astrai_ds.rag.index import Index, model_fingerprint

    if args.k < 1:
        raise UserError(f"-k must be at least 1, got {args.k}")
    index = Index.load(args.index)
    model_dir = model_dir or index.meta.get("model_dir")
    if not model_dir or not Path(model_dir).is_dir():
        raise UserError(f"--index {args.index} was built with the model folder {model_dir}, which is not here: "
                        f"give --model")
    index.check_model(model_fingerprint(model_dir), model_dir)
    model, tokenizer = _load(model_dir, args.dtype)
    return index, Embedder(model, tokenizer, index.meta["pooling"]), model, tokenizer


def _query(args) -> int:
    from astrai_ds.rag.answer import chunk_label

    index, embedder, _, tokenizer = _open(args, args.model)
    for hit in index.search(args.question, embedder, tokenizer, args.k, args.mode):
        c = hit.chunk
        label = chunk_label(c, with_source=True)
        print(f"[{hit.rank}] {hit.score:.4f}  {label}  (characters {c['start']}-{c['end']})")
        print("    " + c["text"].strip().replace("\n", "\n    "))
    return 0


def _ask(args) -> int:
    from astrai_ds.cli.model_commands import check_sampling, compile_decode, stream_to, summary
    from astrai_ds.inference.engine import EngineConfig, LLMEngine
    from astrai_ds.rag.answer import chunk_label, fit_prompt

    index, embedder, model, tokenizer = _open(args, args.model)
    if args.max_new_tokens is None:
        args.max_new_tokens = min(256, model.cfg.max_seq_len // 4)
    params = check_sampling({"max_new_tokens": args.max_new_tokens, "temperature": args.temperature})
    hits = index.search(args.question, embedder, tokenizer, args.k, args.mode)
    engine = LLMEngine(model, tokenizer, EngineConfig(compile=compile_decode(args)))
    messages, used = fit_prompt(engine, args.question, [h.chunk for h in hits], args.max_new_tokens)
    result = stream_to(sys.stdout, engine, messages, params)
    print(flush=True)
    print("sources:" if used else "sources: none (no chunk fits the context with the question)")
    for i, c in enumerate(used, 1):
        print(f"  [{i}] {chunk_label(c, with_source=True)}  (characters {c['start']}-{c['end']})")
    if len(used) < len(hits):
        print(f"  ({len(hits) - len(used)} lower-ranked chunks left out: the context is full)")
    print(summary(result), file=sys.stderr)
    return 0


def _eval(args) -> int:
    import json

    from astrai_ds.cli.model_commands import compile_decode
    from astrai_ds.cli.report import languages
    from astrai_ds.inference.engine import EngineConfig, LLMEngine
    from astrai_ds.rag.evaluate import evaluate_rag, read_questions

    if args.answer_k < 1 or args.max_new_tokens < 1:
        raise UserError("--answer-k and --max-new-tokens must be at least 1")
    questions = read_questions(args.docs)
    index, embedder, model, tokenizer = _open(args, args.model)
    engine = LLMEngine(model, tokenizer, EngineConfig(compile=compile_decode(args)))
    metrics, records = evaluate_rag(index, embedder, engine, questions, args.k, args.answer_k, args.mode,
                                    args.max_new_tokens, progress=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if args.responses:
        with open(args.responses, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    recall = metrics[f"recall_at_{args.k}"]
    print(f"{metrics['questions']} questions; recall at {args.k}: "
          + ", ".join(f"{m} {v:.3f}" for m, v in recall.items()))
    for title, prefix in (("exact answers", "answer_em"), ("answer contained", "answer_contains")):
        print(f"{title}: closed-book {metrics[prefix + '_closed_book']:.3f}, RAG ({args.mode}, top {args.answer_k}) "
              f"{metrics[prefix + '_rag']:.3f}, oracle {metrics[prefix + '_oracle']:.3f}"
              + "".join(f"; {lang} {metrics[lang][prefix + '_closed_book']:.3f} / {metrics[lang][prefix + '_rag']:.3f}"
                        f" / {metrics[lang][prefix + '_oracle']:.3f}" for lang in languages(metrics)))
    return 0
