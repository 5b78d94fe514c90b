"""A retrieval index as a folder, and search over it: dense (faiss), lexical (bm25s over the model's own tokens,
which needs no Chinese word segmenter) and hybrid (reciprocal rank fusion of the two).

    INDEX/index.json     format, the model and tokenizer it was built with (sha256), chunking (parameters and
                         the rules' version), pooling, counts, and per document its content hash and chunk count
                         (what re-indexing compares)
    INDEX/chunks.jsonl   one chunk per line: id, source, start, end, headings, text, n_tokens
    INDEX/vectors.npy    (chunks, dim) float32, unit rows, in chunk order
    INDEX/dense.faiss    the faiss index over the vectors (exact inner product, or HNSW)
    INDEX/bm25/          the bm25s index over the chunks' token ids

The documents come from `rag.documents`. An index is written to a temporary folder beside INDEX and swapped in
when complete, so an interrupted `rag index` leaves the previous index as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from astrai_ds.errors import UserError
from astrai_ds.rag.chunking import RULES, Chunk, ChunkParams, chunk_document
from astrai_ds.rag.documents import Document

FORMAT = 1
INDEX_FILE, CHUNKS_FILE, VECTORS_FILE, DENSE_FILE, BM25_DIR = ("index.json", "chunks.jsonl", "vectors.npy",
                                                                "dense.faiss", "bm25")
DENSE_KINDS = ("auto", "flat", "hnsw")
HNSW_THRESHOLD = 50_000  # auto: exact search below this many chunks, HNSW from here on
MODES = ("dense", "bm25", "hybrid")
RRF_K = 60  # reciprocal rank fusion: score = sum over rankings of 1 / (RRF_K + rank)


class IndexError_(UserError):
    """An index folder is missing, incomplete, or does not belong to the model used with it."""


# ---------------------------------------------------------------- the model an index belongs to


def model_fingerprint(model_dir: str | Path) -> dict:
    """sha256 of the model folder's weights and of its tokenizer: an index is only valid with both."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    with open(model_dir / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    tokenizer = hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest()
    return {"weights_sha256": digest.hexdigest(), "tokenizer_sha256": tokenizer}


# ---------------------------------------------------------------- the folder


@dataclass
class Hit:
    chunk: dict  # a line of chunks.jsonl
    score: float
    rank: int  # 1-based


class Index:
    def __init__(self, path: Path, meta: dict, chunks: list[dict], vectors: np.ndarray, dense, bm25):
        self.path, self.meta, self.chunks, self.vectors = path, meta, chunks, vectors
        self.dense, self.bm25 = dense, bm25

    @classmethod
    def load(cls, path: str | Path) -> "Index":
        import bm25s
        import faiss

        path = Path(path)
        if not path.is_dir():
            raise IndexError_(f"--index {path}: no such folder; build one with `astrai-ds rag index --docs ... "
                              f"--model ... --out {path}`")
        missing = [n for n in (INDEX_FILE, CHUNKS_FILE, VECTORS_FILE, DENSE_FILE, BM25_DIR) if not (path / n).exists()]
        if missing:
            raise IndexError_(f"--index {path} is not a complete index ({', '.join(missing)} missing); build it "
                              f"again with `astrai-ds rag index`")
        try:
            meta = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
            chunks = [json.loads(line) for line in (path / CHUNKS_FILE).read_text(encoding="utf-8").splitlines()]
            vectors = np.load(path / VECTORS_FILE)
        except (ValueError, OSError) as e:
            raise IndexError_(f"--index {path} is damaged ({e}); build it again with `astrai-ds rag index`") from None
        if meta.get("format") != FORMAT or len(chunks) != len(vectors) or len(chunks) != meta["counts"]["chunks"]:
            raise IndexError_(f"--index {path} is damaged or of another format; build it again with "
                              f"`astrai-ds rag index`")
        dense = faiss.read_index(str(path / DENSE_FILE))
        bm25 = bm25s.BM25.load(str(path / BM25_DIR), load_corpus=False) if chunks else None
        return cls(path, meta, chunks, vectors, dense, bm25)

    def check_model(self, fingerprint: dict, model_dir) -> None:
        if fingerprint != self.meta["model"]:
            raise IndexError_(f"--index {self.path} was built with another model than {model_dir} (its weights or "
                              f"tokenizer differ): query it with the model it was built with "
                              f"({self.meta.get('model_dir', 'unknown')}), or build the index again with this one")

    # ------------------------------------------------------------------ search

    def search(self, question: str, embedder, tokenizer, k: int = 5, mode: str = "hybrid",
               query: np.ndarray | None = None) -> list[Hit]:
        """The best k chunks for `question`. `query`: its embedding, (1, dim), when already computed (`rag eval`
        embeds all its questions in one batch)."""
        if mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not self.chunks:
            return []
        n = min(k, len(self.chunks))
        if mode == "dense":
            return self._dense(question, embedder, n, query)
        if mode == "bm25":
            return self._bm25(question, tokenizer, n)
        depth = min(max(4 * k, 50), len(self.chunks))  # fuse deeper rankings than k
        scores: dict[int, float] = {}
        for ranking in (self._dense(question, embedder, depth, query), self._bm25(question, tokenizer, depth)):
            for hit in ranking:
                scores[hit.chunk["id"]] = scores.get(hit.chunk["id"], 0.0) + 1.0 / (RRF_K + hit.rank)
        best = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return [Hit(self.chunks[i], s, r) for r, (i, s) in enumerate(best, 1)]

    def _dense(self, question: str, embedder, k: int, query: np.ndarray | None = None) -> list[Hit]:
        query = embedder([question]) if query is None else query
        scores, ids = self.dense.search(query, k)
        return [Hit(self.chunks[i], float(s), r) for r, (i, s) in enumerate(zip(ids[0], scores[0]), 1) if i >= 0]

    def _bm25(self, question: str, tokenizer, k: int) -> list[Hit]:
        tokens = [str(t) for t in tokenizer.encode(question) if str(t) in self.bm25.vocab_dict]
        if not tokens:
            return []
        ids, scores = self.bm25.retrieve([tokens], k=k, show_progress=False)
        return [Hit(self.chunks[int(i)], float(s), r) for r, (i, s) in enumerate(zip(ids[0], scores[0]), 1) if s > 0]


# ---------------------------------------------------------------- building


def _dense_index(vectors: np.ndarray, kind: str):
    import faiss

    dim = vectors.shape[1]
    if kind == "auto":
        kind = "hnsw" if len(vectors) >= HNSW_THRESHOLD else "flat"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 200, 128
    if len(vectors):
        index.add(vectors)
    return index, kind


def _bm25_index(chunks: list[dict], tokenizer):
    import bm25s

    bm25 = bm25s.BM25()
    bm25.index([[str(t) for t in tokenizer.encode(c["text"])] or ["<empty>"] for c in chunks], show_progress=False)
    return bm25


def build_index(docs: list[Document], model_dir, out: str | Path, model, tokenizer, params: ChunkParams,
                pooling: str = "mean", dense: str = "auto", progress: bool = True, shard=None) -> dict:
    """Chunk and embed `docs` into the index folder `out`; what an index already at `out` holds for an
    unchanged document (same content, model, chunking and pooling) is reused, so building again from the same
    documents gives the same index. A source given twice is indexed once. Returns the new index.json.

    shard: (rank, world_size, all_gather_object) when several ranks index together: every rank chunks the same
    documents, embeds every world_size-th new chunk, and rank 0 gathers the vectors and writes the folder."""
    from astrai_ds.inference.progress import Progress
    from astrai_ds.inference.embed import Embedder

    out = Path(out)
    if dense not in DENSE_KINDS:
        raise UserError(f"--dense must be one of {', '.join(DENSE_KINDS)}, got {dense!r}")
    fingerprint = model_fingerprint(model_dir)
    embedder = Embedder(model, tokenizer, pooling)
    settings = {"chunking": {**asdict(params), "rules": RULES}, "pooling": pooling}
    previous = _reusable(out, fingerprint, settings)

    old_files, old_chunks = {}, {}
    if previous is not None:
        old_files, old_chunks = previous.meta["files"], _by_source(previous.chunks)
    chunks: list[dict] = []
    vectors: list[np.ndarray] = []
    files, fresh = {}, []  # fresh: positions in chunks still to embed
    reused = 0
    for doc in docs:
        if doc.source in files:  # named twice: its chunks once
            continue
        sha, first, old = doc.sha256, len(chunks), old_chunks.get(doc.source, [])
        if old_files.get(doc.source, {}).get("sha256") == sha and _tiles(old):
            for c in old:
                chunks.append({**c, "id": len(chunks)})
                vectors.append(previous.vectors[c["id"]])
            reused += len(chunks) - first
        else:
            for c in chunk_document(doc.text, doc.source, tokenizer, params, doc.markdown,
                                    embed=embedder if params.semantic else None):
                fresh.append(len(chunks))
                chunks.append(_chunk_record(len(chunks), c))
                vectors.append(None)
        files[doc.source] = {"sha256": sha, "chunks": len(chunks) - first}
    rank, world, gather = shard or (0, 1, None)
    mine = fresh[rank::world]
    bar = Progress(len(mine), "embedding" if world == 1 else f"embedding (rank {rank} of {world})", "chunk",
                   progress and rank == 0)
    new = embedder([chunks[i]["text"] for i in mine], progress=bar.update) if mine else []
    bar.close()
    for part_ids, part_vectors in (gather((mine, new)) if world > 1 else [(mine, new)]):
        for i, v in zip(part_ids, part_vectors):
            vectors[i] = v
    matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, embedder.dim), np.float32)
    dense_index, dense_kind = _dense_index(matrix, dense)
    meta = {"format": FORMAT, "model": fingerprint, "model_dir": str(Path(model_dir).resolve()), **settings,
            "dense": dense_kind, "dim": int(embedder.dim),
            "counts": {"documents": len(files), "chunks": len(chunks), "embedded": len(fresh), "reused": reused,
                       "tokens": sum(c["n_tokens"] for c in chunks)},
            "files": files}
    if rank == 0:
        _write(out, meta, chunks, matrix, dense_index, _bm25_index(chunks, tokenizer) if chunks else None)
    return meta


def _chunk_record(i: int, c: Chunk) -> dict:
    return {"id": i, "source": c.source, "start": c.start, "end": c.end, "headings": list(c.headings),
            "text": c.text, "n_tokens": c.n_tokens}


def _by_source(chunks: list[dict]) -> dict[str, list[dict]]:
    """The chunks of each source, in order: one pass, so that re-indexing stays linear in the chunks."""
    out: dict[str, list[dict]] = {}
    for c in chunks:
        out.setdefault(c["source"], []).append(c)
    return out


def _tiles(chunks: list[dict]) -> bool:
    """Whether a document's chunks follow one another from its start, as chunking makes them (an index that holds
    a file twice, as one written before inputs were deduplicated does, is chunked again)."""
    return bool(chunks) and chunks[0]["start"] == 0 and all(a["end"] == b["start"]
                                                            for a, b in zip(chunks, chunks[1:]))


def _reusable(out: Path, fingerprint: dict, settings: dict) -> Index | None:
    """The index at `out` if its chunks can be reused (same model, chunking and pooling), else None."""
    if not (out / INDEX_FILE).exists():
        return None
    try:
        previous = Index.load(out)
    except UserError as e:
        print(f"warning: {e}; indexing everything again", file=sys.stderr)
        return None
    same = previous.meta["model"] == fingerprint and all(previous.meta.get(k) == v for k, v in settings.items())
    return previous if same else None


def _write(out: Path, meta: dict, chunks: list[dict], vectors: np.ndarray, dense_index, bm25) -> None:
    import faiss

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder path")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with open(tmp / CHUNKS_FILE, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in chunks)
        np.save(tmp / VECTORS_FILE, vectors)
        faiss.write_index(dense_index, str(tmp / DENSE_FILE))
        (tmp / BM25_DIR).mkdir()
        if bm25 is not None:
            bm25.save(str(tmp / BM25_DIR), show_progress=False)
        (tmp / INDEX_FILE).write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            if not (out / INDEX_FILE).exists() and any(out.iterdir()):
                raise UserError(f"--out {out} is a folder that is not an index; give an empty or new folder")
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
