"""Embeddings, the index folder and retrieval: pooled embeddings do not depend on the batch; every search mode
finds what it should; faiss agrees with a brute-force numpy search, and HNSW with the exact index; re-indexing
embeds only what changed and gives the index a fresh build gives, in one pass over the earlier chunks; an index
answers only to its own model; bad input is one clear message and never costs the previous index."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from astrai_ds.cli.main import main
from astrai_ds.errors import UserError
from astrai_ds.model.io import load_model_folder, save_model_folder
from astrai_ds.rag.chunking import RULES, ChunkParams
from astrai_ds.inference.embed import Embedder
from astrai_ds.rag import index as index_module
from astrai_ds.rag.documents import read_documents
from astrai_ds.rag.index import Index, build_index, model_fingerprint

DOCS = {
    "countries/vela.md": "# Vela\n\nVela is a mountain country. Its capital is Orin.\n\n## Trade\n\n"
                         "Vela exports glass and violins to every harbour of the north.\n",
    "countries/star.md": "# 星河共和国\n\n星河共和国的首都是银湾市。\n\n## 货币\n\n它的货币叫流明，一流明等于二点七五克朗。\n",
    "people.txt": "Ada Lin was the first president of Vela.\n\nShe founded the glass academy in 1821.\n",
    "more.jsonl": json.dumps({"text": "# Kiro\n\nKiro is a river that floods every spring."}) + "\n",
}


@pytest.fixture(scope="module")
def model_512(long_model_dir):
    return long_model_dir


@pytest.fixture
def docs_dir(tmp_path):
    root = tmp_path / "docs"
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


def _build(docs_dir, model_dir, out, **kw):
    model, tokenizer = load_model_folder(model_dir, dtype=torch.float32)
    docs, skipped = read_documents([docs_dir])
    meta = build_index(docs, model_dir, out, model, tokenizer, ChunkParams(max_tokens=kw.pop("max_tokens", 48)),
                       progress=False, **kw)
    return meta, model, tokenizer


def test_embeddings_do_not_depend_on_the_batch(model_512):
    model, tokenizer = load_model_folder(model_512, dtype=torch.float32)
    texts = ["short", "a somewhat longer text about glass and violins", "中文的句子，长一点。", "x"]
    for pooling in ("mean", "last"):
        e = Embedder(model, tokenizer, pooling)
        together = e(texts)
        alone = np.concatenate([e([t]) for t in texts])
        np.testing.assert_allclose(together, alone, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(texts[1])])
    with torch.no_grad():
        h = model.head.norm(model.hidden(ids))[0]  # (T, dim)
    expected = {"mean": h.mean(0), "last": h[-1]}
    for pooling, v in expected.items():
        got = Embedder(model, tokenizer, pooling)([texts[1]])[0]
        np.testing.assert_allclose(got, (v / v.norm()).numpy(), atol=1e-5)


def test_every_mode_finds_the_right_chunk(docs_dir, model_512, tmp_path):
    meta, model, tokenizer = _build(docs_dir, model_512, tmp_path / "index")
    index = Index.load(tmp_path / "index")
    embedder = Embedder(model, tokenizer, meta["pooling"])
    assert meta["counts"]["documents"] == 4 and meta["counts"]["chunks"] == len(index.chunks)
    target = next(c for c in index.chunks if "银湾市" in c["text"])
    assert target["headings"] == ["星河共和国"] and target["source"].endswith("star.md")
    # dense: a chunk's own text is its nearest neighbour (cosine 1)
    assert index.search(target["text"], embedder, tokenizer, 3, "dense")[0].chunk["id"] == target["id"]
    # bm25: the rare words of the question
    assert index.search("银湾市", embedder, tokenizer, 3, "bm25")[0].chunk["id"] == target["id"]
    hybrid = index.search(target["text"], embedder, tokenizer, 3, "hybrid")
    assert hybrid[0].chunk["id"] == target["id"] and [h.rank for h in hybrid] == [1, 2, 3]
    # faiss (exact) agrees with a brute-force numpy search over the same vectors
    q = embedder(["Which country exports violins?"])
    brute = np.argsort(-(index.vectors @ q[0]), kind="stable")[:5].tolist()
    assert [h.chunk["id"] for h in index.search("Which country exports violins?", embedder, tokenizer, 5,
                                                "dense")] == brute


def test_hnsw_and_flat_agree(docs_dir, model_512, tmp_path):
    _, model, tokenizer = _build(docs_dir, model_512, tmp_path / "flat", dense="flat")
    _build(docs_dir, model_512, tmp_path / "hnsw", dense="hnsw")
    flat, hnsw = Index.load(tmp_path / "flat"), Index.load(tmp_path / "hnsw")
    assert (flat.meta["dense"], hnsw.meta["dense"]) == ("flat", "hnsw")
    assert (type(flat.dense).__name__, type(hnsw.dense).__name__) == ("IndexFlatIP", "IndexHNSWFlat")
    embedder = Embedder(model, tokenizer)
    questions = [c["text"] for c in flat.chunks] + ["Which country exports violins?", "首都", "Who was Ada Lin?"]
    for q in questions:
        exact, approximate = (i.search(q, embedder, tokenizer, 5, "dense") for i in (flat, hnsw))
        assert [h.chunk["id"] for h in approximate] == [h.chunk["id"] for h in exact], q
        np.testing.assert_allclose([h.score for h in approximate], [h.score for h in exact], atol=1e-5)
    for c in hnsw.chunks:  # a chunk's own text finds it
        assert hnsw.search(c["text"], embedder, tokenizer, 1, "dense")[0].chunk["id"] == c["id"]


def test_reindexing_embeds_only_what_changed(docs_dir, model_512, tmp_path):
    out = tmp_path / "index"
    first, _, _ = _build(docs_dir, model_512, out)
    before = Index.load(out)
    again, _, _ = _build(docs_dir, model_512, out)
    assert again["counts"]["embedded"] == 0 and again["counts"]["reused"] == first["counts"]["chunks"]
    np.testing.assert_array_equal(Index.load(out).vectors, before.vectors)

    (docs_dir / "people.txt").write_text("Ada Lin was the first president of Vela. She loved rivers.\n")
    (docs_dir / "more.jsonl").unlink()
    changed, _, _ = _build(docs_dir, model_512, out)
    after = Index.load(out)
    assert changed["counts"]["embedded"] == sum(c["source"].endswith("people.txt") for c in after.chunks)
    assert not any("Kiro" in c["text"] for c in after.chunks)
    assert set(changed["files"]) == {str(docs_dir / n) for n in DOCS if n != "more.jsonl"}
    assert [c["id"] for c in after.chunks] == list(range(len(after.chunks)))


def test_an_incremental_reindex_is_a_fresh_build(docs_dir, model_512, tmp_path):
    model, tokenizer = load_model_folder(model_512, dtype=torch.float32)

    def build(out):
        docs, _ = read_documents([docs_dir, docs_dir / "people.txt"])  # a file named twice is read once
        docs += docs[:1]  # and a document given twice is indexed once
        return build_index(docs, model_512, out, model, tokenizer, ChunkParams(max_tokens=24), progress=False)

    first = build(tmp_path / "index")
    assert first["counts"]["documents"] == len(DOCS)
    for _ in range(2):  # unchanged documents: the same index, every time
        again = build(tmp_path / "index")
        assert again["counts"]["embedded"] == 0 and again["counts"]["chunks"] == first["counts"]["chunks"]
    (docs_dir / "people.txt").write_text("Ada Lin was the first president of Vela.\n\nShe loved rivers.\n")
    (docs_dir / "more.jsonl").unlink()
    (docs_dir / "new.md").write_text("# Orin\n\nOrin is the capital of Vela. It has a glass market.\n")
    incremental, fresh = build(tmp_path / "index"), build(tmp_path / "fresh")
    a, b = Index.load(tmp_path / "index"), Index.load(tmp_path / "fresh")
    assert a.chunks == b.chunks and len({(c["source"], c["start"]) for c in a.chunks}) == len(a.chunks)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)
    assert incremental["files"] == fresh["files"] and incremental["dense"] == fresh["dense"]
    changed = sum(c["source"].endswith(("people.txt", "new.md")) for c in b.chunks)
    assert (incremental["counts"]["embedded"], fresh["counts"]["embedded"]) == (changed, len(b.chunks))
    assert incremental["counts"]["reused"] == len(b.chunks) - changed > 0
    query = Embedder(model, tokenizer)(["the capital of Vela"])
    assert a.dense.search(query, 5)[1].tolist() == b.dense.search(query, 5)[1].tolist()


def test_an_index_holding_a_document_twice_is_mended(docs_dir, model_512, tmp_path):
    """An index from before inputs were deduplicated holds a file's chunks twice: the next run chunks it again."""
    out = tmp_path / "index"
    first, _, _ = _build(docs_dir, model_512, out)
    meta = json.loads((out / "index.json").read_text())
    chunks = [json.loads(line) for line in (out / "chunks.jsonl").read_text().splitlines()]
    twice = [c for c in chunks if c["source"].endswith("people.txt")]
    chunks += [{**c, "id": len(chunks) + i} for i, c in enumerate(twice)]
    vectors = np.load(out / "vectors.npy")
    np.save(out / "vectors.npy", np.concatenate([vectors, vectors[[c["id"] for c in twice]]]))
    (out / "chunks.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chunks))
    meta["counts"]["chunks"] = len(chunks)
    meta["files"][twice[0]["source"]]["chunks"] *= 2
    (out / "index.json").write_text(json.dumps(meta))
    again, _, _ = _build(docs_dir, model_512, out)
    assert again["counts"]["chunks"] == first["counts"]["chunks"] and again["counts"]["embedded"] == len(twice)
    assert Index.load(out).chunks == chunks[:first["counts"]["chunks"]]


def test_an_index_chunked_by_earlier_rules_is_chunked_again(docs_dir, model_512, tmp_path):
    out = tmp_path / "index"
    first, _, _ = _build(docs_dir, model_512, out)
    assert first["chunking"]["rules"] == RULES
    meta = json.loads((out / "index.json").read_text())
    del meta["chunking"]["rules"]  # as an index written before the rules had a version
    (out / "index.json").write_text(json.dumps(meta))
    again, _, _ = _build(docs_dir, model_512, out)
    assert again["counts"]["embedded"] == first["counts"]["chunks"] and again["chunking"]["rules"] == RULES


def test_reindexing_reads_each_earlier_chunk_once(docs_dir, model_512, tmp_path, monkeypatch):
    """Linear, not quadratic: the earlier chunks are grouped by document once, not scanned again per document."""
    out = tmp_path / "index"
    first, _, _ = _build(docs_dir, model_512, out)
    reads = []

    class Counted(dict):
        def __getitem__(self, key):
            reads.append(key)
            return super().__getitem__(key)

    reusable = index_module._reusable

    def counted(*args):
        previous = reusable(*args)
        previous.chunks = [Counted(c) for c in previous.chunks]
        return previous

    monkeypatch.setattr(index_module, "_reusable", counted)
    again, _, _ = _build(docs_dir, model_512, out)
    assert again["counts"]["reused"] == first["counts"]["chunks"] > len(DOCS)
    assert reads.count("source") == first["counts"]["chunks"], reads


def test_an_index_answers_only_to_its_model(docs_dir, model_512, model_dir, tmp_path, capsys):
    _build(docs_dir, model_512, tmp_path / "index")
    code = main(["rag", "query", "--index", str(tmp_path / "index"), "--question", "capital", "--model",
                 str(model_dir)])
    assert code == 2 and "was built with another model" in capsys.readouterr().err


def test_bad_input_is_a_clear_message(docs_dir, model_512, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["rag", "index", "--docs", str(empty), "--model", str(model_512), "--out", str(tmp_path / "i")]) == 2
    assert "no documents to index" in capsys.readouterr().err
    (docs_dir / "blob.txt").write_bytes(b"\x00\x01\x02")
    (docs_dir / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    docs, skipped = read_documents([docs_dir])
    assert len(docs) == 4
    assert any("blob.txt: binary" in s for s in skipped) and any("latin1.md: not UTF-8" in s for s in skipped)
    assert main(["rag", "query", "--index", str(tmp_path / "nowhere"), "--question", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err
    half = tmp_path / "half"
    half.mkdir()
    (half / "index.json").write_text("{}")
    assert main(["rag", "query", "--index", str(half), "--question", "x"]) == 2
    assert "not a complete index" in capsys.readouterr().err


def test_an_interrupted_index_leaves_the_previous_one(docs_dir, model_512, tmp_path, monkeypatch):
    out = tmp_path / "index"
    _build(docs_dir, model_512, out)
    before = (out / "chunks.jsonl").read_text()
    (docs_dir / "people.txt").write_text("Something else entirely.\n")
    import faiss

    def broken(*args):
        raise KeyboardInterrupt  # killed while writing the new index

    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(KeyboardInterrupt):
        _build(docs_dir, model_512, out)
    assert (out / "chunks.jsonl").read_text() == before
    assert Index.load(out).meta["counts"]["chunks"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_ask_streams_an_answer_and_lists_its_sources(docs_dir, model_512, tmp_path, capsys):
    assert main(["rag", "index", "--docs", str(docs_dir), "--model", str(model_512), "--out", str(tmp_path / "i"),
                 "--max-tokens", "48", "--dtype", "fp32"]) == 0
    capsys.readouterr()
    assert main(["rag", "ask", "--index", str(tmp_path / "i"), "--model", str(model_512), "--question",
                 "What is the capital of 星河共和国?", "-k", "3", "--max-new-tokens", "8", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    sources = out[out.index("sources:"):].splitlines()[1:]
    assert 1 <= len([s for s in sources if s.strip().startswith("[")]) <= 3
    assert any("star.md" in s for s in sources)
    # compiled decoding: the same answer and sources
    assert main(["rag", "ask", "--index", str(tmp_path / "i"), "--model", str(model_512), "--question",
                 "What is the capital of 星河共和国?", "-k", "3", "--max-new-tokens", "8", "--dtype", "fp32",
                 "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == out and "could not be compiled" not in compiled.err
    # a question that leaves no room for the answer
    assert main(["rag", "ask", "--index", str(tmp_path / "i"), "--model", str(model_512), "--question",
                 "why " * 600, "--dtype", "fp32"]) == 2
    assert "--question is too long" in capsys.readouterr().err


def test_model_fingerprint_changes_with_the_weights(model_512, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model_512, copy)
    assert model_fingerprint(copy) == model_fingerprint(model_512)
    model, tokenizer = load_model_folder(copy, dtype=torch.float32)
    with torch.no_grad():
        model.head.norm.weight.add_(0.01)
    save_model_folder(model, tokenizer, copy)
    assert model_fingerprint(copy) != model_fingerprint(model_512)
    with pytest.raises(UserError):
        Index.load(tmp_path / "missing")


@pytest.mark.multiproc
def test_two_ranks_build_the_index_one_builds(docs_dir, model_512, tmp_path, capsys):
    from conftest import free_port, run_ranks

    args = ["--docs", str(docs_dir), "--model", str(model_512), "--max-tokens", "24", "--dtype", "fp32"]
    # `deepspeed --num_gpus 2 --module astrai_ds rag index ...`, its ranks started directly
    proc = run_ranks("astrai_ds", ["rag", "index", *args, "--out", str(tmp_path / "two")], 2, free_port(),
                     extra_env={"OMP_NUM_THREADS": "1"}, module=True)
    assert "embedding (rank 0 of 2)" in proc.stderr and proc.stderr.count(" chunks (") == 1, proc.stderr
    assert main(["rag", "index", *args, "--out", str(tmp_path / "one")]) == 0
    one, two = Index.load(tmp_path / "one"), Index.load(tmp_path / "two")
    assert one.chunks == two.chunks and one.meta["counts"] == two.meta["counts"]
    np.testing.assert_allclose(one.vectors, two.vectors, atol=1e-5)
