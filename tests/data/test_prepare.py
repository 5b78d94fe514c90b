import json

import pytest

from astrai_ds.data.prepare import prepare_pretrain
from astrai_ds.data.shards import TokenShards
from astrai_ds.errors import DataError


@pytest.fixture
def messy_inputs(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document {i}: 你好 world"}, ensure_ascii=False) for i in range(40)]
    lines[3] = "{not json"
    lines[7] = json.dumps({"title": "no text"})
    lines[9] = json.dumps({"text": 42})
    lines[11] = json.dumps({"text": "   "})
    lines[13] = json.dumps(["a list"])
    jsonl.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    txt = tmp_path / "lines.txt"
    txt.write_text("first line\n\nsecond line 123\nthird\r\n", encoding="utf-8")
    return [jsonl, txt]


def test_workers_give_identical_shards(messy_inputs, tokenizer_dir, tokenizer, tmp_path):
    one = prepare_pretrain(messy_inputs, tokenizer_dir, tmp_path / "w1", seq_len=16, workers=1, batch_size=7,
                           progress=False)
    two = prepare_pretrain(messy_inputs, tokenizer_dir, tmp_path / "w2", seq_len=16, workers=2, batch_size=7,
                           progress=False)
    for name in ("tokens_00000.bin", "doc_offsets_00000.npy", "index.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert one["num_tokens"] == two["num_tokens"] and one["num_documents"] == two["num_documents"] == 35 + 3

    shards = TokenShards(tmp_path / "w1")
    meta = shards.meta
    assert meta["stage"] == "pt" and meta["seq_len"] == 16 and meta["vocab_size"] == tokenizer.vocab_size
    assert meta["tokenizer_hash"] == tokenizer.hash
    # Every document is [bos] + tokens + [eos], in input order.
    starts = shards.document_starts()
    first = shards.read(int(starts[0]), int(starts[1] - starts[0])).tolist()
    assert first == [tokenizer.bos_id] + tokenizer.encode("document 0: 你好 world") + [tokenizer.eos_id]
    last = shards.read(int(starts[-1]), shards.num_tokens - int(starts[-1])).tolist()
    assert tokenizer.decode(last) == "third"  # CRLF stripped, like LF


def test_skipped_records_are_counted(messy_inputs, tokenizer_dir, tmp_path):
    summary = prepare_pretrain(messy_inputs, tokenizer_dir, tmp_path / "out", seq_len=16, workers=1,
                               progress=False)
    expected = {"invalid_json": 1, "missing_text": 3, "empty_text": 1}
    assert summary["skipped"] == expected
    assert summary["skipped_examples"]["invalid_json"] == [f"{messy_inputs[0]}:4"]
    assert TokenShards(tmp_path / "out").meta["skipped"] == expected


def test_overwrites_previous_output_only_when_asked(messy_inputs, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    prepare_pretrain(messy_inputs, tokenizer_dir, out, seq_len=4, workers=1, progress=False)
    index = (out / "index.json").read_bytes()
    small = tmp_path / "small.txt"
    small.write_text("just one line\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{out} already holds stage pt shards: 38 documents.*--overwrite"):
        prepare_pretrain([small], tokenizer_dir, out, seq_len=4, workers=1, progress=False)
    assert (out / "index.json").read_bytes() == index
    summary = prepare_pretrain([small], tokenizer_dir, out, seq_len=4, workers=1, progress=False, overwrite=True)
    assert summary["num_documents"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["doc_offsets_00000.npy", "index.json", "tokens_00000.bin"]


def test_empty_corpus_error(tokenizer_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n{"bad": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match="empty corpus.*empty_text: 1.*missing_text: 1"):
        prepare_pretrain([empty], tokenizer_dir, tmp_path / "out", seq_len=4, workers=1, progress=False)
    assert not (tmp_path / "out" / "index.json").exists()


def test_input_errors(tokenizer_dir, tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file extension '.csv'"):
        prepare_pretrain([tmp_path / "data.csv"], tokenizer_dir, tmp_path / "out", seq_len=4, progress=False)
    with pytest.raises(DataError, match="not found"):
        prepare_pretrain([tmp_path / "nope.txt"], tokenizer_dir, tmp_path / "out", seq_len=4, progress=False)
    (tmp_path / "ok.txt").write_text("x\n")
    with pytest.raises(DataError, match="astrai-ds tokenizer"):
        prepare_pretrain([tmp_path / "ok.txt"], tmp_path, tmp_path / "out", seq_len=4, progress=False)


def test_tiny_corpus_warns(tokenizer_dir, tmp_path):
    (tmp_path / "ok.txt").write_text("x\n")
    summary = prepare_pretrain([tmp_path / "ok.txt"], tokenizer_dir, tmp_path / "out", seq_len=64,
                               workers=1, progress=False)
    assert summary["num_samples"] == 0 and "too few" in summary["warnings"][0]
    shards = TokenShards(tmp_path / "out")
    tokens = shards.read(0, shards.num_tokens).tolist()
    assert tokens[0] == 1 and tokens[-1] == 2 and shards.num_tokens == summary["num_tokens"] == 3
