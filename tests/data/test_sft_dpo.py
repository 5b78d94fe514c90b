"""SFT and DPO data: prepare (skips counted by reason), masked shards, datasets, packing and collate."""

import json
import random

import numpy as np
import pytest
import torch

from astrai_ds.cli.main import main
from astrai_ds.data.chat import render_chat, render_response
from astrai_ds.data.datasets import (IGNORE_INDEX, DPODataset, PretrainDataset, SFTDataset, collate_dpo,
                                     collate_sft, first_fit)
from astrai_ds.data.prepare import prepare_dpo, prepare_pretrain, prepare_sft
from astrai_ds.data.shards import ShardWriter, TokenShards
from astrai_ds.errors import DataError
from astrai_ds.model import ModelConfig, Transformer
from astrai_ds.model.masks import block_causal_mask
from astrai_ds.model import losses


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def _chat(*turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"messages": messages}


GOOD_SFT = [_chat(f"What is {i} + 1?", f"{i} + 1 = {i + 1}.") for i in range(6)] + [
    _chat("你好", "你好！", "星期一的后一天是？", "星期二", system="你是一个助手。"),
    {"prompt": "The day after Monday is", "response": "Tuesday"},
]
BAD_SFT = {  # reason -> a record that is skipped for it
    "unknown_role": {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
    "no_assistant_turn": {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
    "empty_content": _chat("hi", ""),
    "last_not_assistant": _chat("hi", "hello", "and?"),
    "missing_fields": {"text": "pretraining text"},
    "invalid_json": "{not json",
    "too_long": _chat("word " * 120, "short answer"),
}


@pytest.fixture
def sft_file(tmp_path):
    records = GOOD_SFT[:4] + list(BAD_SFT.values()) + GOOD_SFT[4:]
    return _jsonl(tmp_path / "chats.jsonl", records)


def test_prepare_sft_counts_skips_and_stores_masks(sft_file, tokenizer_dir, tokenizer, tmp_path):
    s = prepare_sft([sft_file], tokenizer_dir, tmp_path / "sft", seq_len=96, workers=1, progress=False)
    assert s["num_conversations"] == s["num_documents"] == len(GOOD_SFT)
    assert s["skipped"] == {reason: 1 for reason in BAD_SFT}
    line = {reason: 5 + i for i, reason in enumerate(BAD_SFT)}  # 1-based: after the first 4 good records
    for reason, examples in s["skipped_examples"].items():
        assert examples[0].startswith(f"{sft_file}:{line[reason]}"), (reason, examples)
    assert "role 'bot'" in s["skipped_examples"]["unknown_role"][0]
    assert set(s["skip_reasons"]) == set(BAD_SFT)
    shards = TokenShards(tmp_path / "sft")
    meta = shards.meta
    assert meta["stage"] == "sft" and meta["num_conversations"] == len(GOOD_SFT) and shards.has_masks
    assert meta["skipped"] == s["skipped"] and meta["pad_id"] == tokenizer.pad_id == 0
    starts, lengths = shards.document_starts(), shards.document_lengths()
    from astrai_ds.data.chat import normalize_record

    for d, record in enumerate(GOOD_SFT):
        ids, mask = render_chat(tokenizer, normalize_record(record))
        assert shards.read(int(starts[d]), int(lengths[d])).tolist() == ids
        assert shards.read_mask(int(starts[d]), int(lengths[d])).tolist() == mask
    assert s["num_trained_tokens"] == sum(int(shards.read_mask(0, shards.num_tokens).sum()) for _ in [0])


def test_prepare_sft_keeps_overlong_conversations_and_warns(tokenizer_dir, tmp_path):
    path = _jsonl(tmp_path / "long.jsonl", [_chat("q", "answer " * 40), _chat("q", "a")])
    s = prepare_sft([path], tokenizer_dir, tmp_path / "out", seq_len=32, workers=1, progress=False)
    assert s["num_conversations"] == 2 and s["num_overlong"] == 1 and s["skipped"] == {}
    assert "longer than seq_len 32" in s["warnings"][0]


def test_prepare_sft_workers_give_identical_shards(sft_file, tokenizer_dir, tmp_path):
    for workers in (1, 2):
        prepare_sft([sft_file], tokenizer_dir, tmp_path / f"w{workers}", seq_len=96, workers=workers,
                    batch_size=3, progress=False)
    for name in ("tokens_00000.bin", "masks_00000.bin", "doc_offsets_00000.npy", "index.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


PAIRS = [
    {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "4"},
    {"prompt": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "What is 3 + 3?"},
                {"role": "assistant", "content": "6"}, {"role": "user", "content": "And 3 + 4?"}],
     "chosen": "3 + 4 = 7.", "rejected": "3 + 4 = 8."},
    {"messages": [{"role": "user", "content": "星期一的后一天是星期几？"}], "chosen": "星期一的后一天是星期二。",
     "rejected": "星期三"},
]
BAD_PAIRS = {
    "identical_pair": {"prompt": "q", "chosen": "same", "rejected": "same"},
    "empty_response": {"prompt": "q", "chosen": "a", "rejected": ""},
    "too_long": {"prompt": "q", "chosen": "a", "rejected": "long " * 120},
    "missing_fields": {"prompt": "q", "chosen": "a"},
    "last_not_user": {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                      "chosen": "a", "rejected": "b"},
    "unknown_role": {"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
}


def test_prepare_dpo_pairs_and_skips(tokenizer_dir, tokenizer, tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", PAIRS[:1] + list(BAD_PAIRS.values()) + PAIRS[1:])
    s = prepare_dpo([path], tokenizer_dir, tmp_path / "dpo", seq_len=96, workers=1, progress=False)
    assert s["num_pairs"] == len(PAIRS) and s["num_documents"] == 2 * len(PAIRS)
    assert s["skipped"] == {reason: 1 for reason in BAD_PAIRS}
    assert s["skipped_examples"]["too_long"][0].startswith(f"{path}:4 ")
    shards = TokenShards(tmp_path / "dpo")
    assert shards.meta["stage"] == "dpo" and shards.meta["num_pairs"] == len(PAIRS)

    ds = DPODataset(shards, seq_len=96)
    assert len(ds) == len(PAIRS)
    from astrai_ds.data.chat import normalize_pair

    for i, record in enumerate(PAIRS):
        prompt, chosen, rejected = normalize_pair(record)
        item = ds[i]
        assert item["index"] == i
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids, mask = render_response(tokenizer, prompt, response)
            assert item[f"{side}_tokens"].tolist() == ids and item[f"{side}_mask"].tolist() == mask
            trained = item[f"{side}_tokens"][item[f"{side}_mask"] == 1]
            assert tokenizer.decode(trained, skip_special_tokens=False) == response + "<|im_end|>"

    batch = collate_dpo([ds[2], ds[0], ds[1]])
    assert set(batch) == {"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels", "index"}
    T = max(len(ds[i][f"{side}_tokens"]) - 1 for i in range(3) for side in ("chosen", "rejected"))
    for key in ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"):
        assert batch[key].shape == (3, T) and batch[key].dtype == torch.long, key
    assert batch["index"].tolist() == [2, 0, 1]
    # Labels are the next token on the response (and its <|im_end|>), ignored on the prompt and padding.
    for b, i in enumerate([2, 0, 1]):
        for side in ("chosen", "rejected"):
            tokens, mask = ds[i][f"{side}_tokens"], ds[i][f"{side}_mask"]
            n = len(tokens) - 1
            labels = batch[f"{side}_labels"][b]
            assert batch[f"{side}_input_ids"][b, :n].tolist() == tokens[:-1].tolist()
            assert (batch[f"{side}_input_ids"][b, n:] == 0).all() and (labels[n:] == IGNORE_INDEX).all()
            trained = labels[labels != IGNORE_INDEX].tolist()
            assert trained == tokens[1:][mask[1:] == 1].tolist() and trained[-1] == tokenizer.im_end_id

    with pytest.raises(DataError, match=r"do not fit seq_len 8.*--seq-len 8"):
        DPODataset(shards, seq_len=8)


def test_empty_result_is_an_error(tokenizer_dir, tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", list(BAD_PAIRS.values()))
    with pytest.raises(DataError, match=r"no usable preference pairs.*identical_pair: 1"):
        prepare_dpo([path], tokenizer_dir, tmp_path / "out", seq_len=32, workers=1, progress=False)
    assert not (tmp_path / "out" / "index.json").exists()
    with pytest.raises(DataError, match=r"no usable conversations.*missing_fields: 6"):  # pairs are not chats
        prepare_sft([path], tokenizer_dir, tmp_path / "out", seq_len=32, workers=1, progress=False)
    (tmp_path / "chats.txt").write_text("plain text\n")
    with pytest.raises(DataError, match=r"chats\.txt.*must be \.jsonl"):
        prepare_sft([tmp_path / "chats.txt"], tokenizer_dir, tmp_path / "out", seq_len=32, progress=False)


def test_stage_mismatch_names_the_folder_and_the_prepare_stage(sft_file, tokenizer_dir, tmp_path):
    prepare_sft([sft_file], tokenizer_dir, tmp_path / "sft", seq_len=96, workers=1, progress=False)
    (tmp_path / "pt.txt").write_text("some text\n" * 50)
    prepare_pretrain([tmp_path / "pt.txt"], tokenizer_dir, tmp_path / "pt", seq_len=8, workers=1, progress=False)
    sft, pt = TokenShards(tmp_path / "sft"), TokenShards(tmp_path / "pt")
    with pytest.raises(DataError, match=rf"{tmp_path / 'pt'} holds 'pt' data.*prepare --stage sft"):
        SFTDataset(pt, 24)
    with pytest.raises(DataError, match=rf"{tmp_path / 'sft'} holds 'sft' data.*prepare --stage dpo"):
        DPODataset(sft, 24)
    with pytest.raises(DataError, match=rf"{tmp_path / 'sft'} holds 'sft' data.*prepare --stage pt"):
        PretrainDataset(sft, 8)
    assert len(PretrainDataset(pt, 8)) > 0


def test_cli_prepare_stages(sft_file, tokenizer_dir, tmp_path, capsys):
    assert main(["prepare", "--stage", "sft", "--input", str(sft_file), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "sft"), "--seq-len", "96", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {len(GOOD_SFT)} conversations" in out
    assert (f"skipped 1 records: unknown_role: a message's role is not one of system, user, assistant "
            f"(e.g. {sft_file}:5") in out
    pairs = _jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["prepare", "--stage", "dpo", "--input", str(pairs), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "dpo"), "--seq-len", "96", "--workers", "1"]) == 0
    assert f"wrote {len(PAIRS)} pairs ({2 * len(PAIRS)} documents)" in capsys.readouterr().out
    assert main(["prepare", "--stage", "dpo", "--input", str(sft_file), "--tokenizer", str(tokenizer_dir),
                 "--out", str(tmp_path / "x"), "--workers", "1"]) == 2
    assert "no usable preference pairs" in capsys.readouterr().err


# ---------------------------------------------------------------- packing and collate on hand-made shards


def _sft_shards(path, docs, vocab_size=64):
    """docs: (length, first trained position) per conversation; tokens are random, mask 1 from that position."""
    rng = np.random.default_rng(0)
    w = ShardWriter(path, vocab_size, {"stage": "sft", "pad_id": 0}, masks=True)
    for n, first in docs:
        mask = np.zeros(n, dtype=np.uint8)
        mask[first:] = 1
        w.add(np.concatenate([[1], rng.integers(5, vocab_size, size=n - 1)]), mask)
    w.close()
    return TokenShards(path)


def _brute_first_fit(lengths, capacity):
    bins, free = [], []
    for i, n in enumerate(lengths):
        b = next((b for b, f in enumerate(free) if f >= n), len(bins))
        if b == len(bins):
            bins.append([])
            free.append(capacity)
        bins[b].append(i)
        free[b] -= n
    return bins


def test_first_fit():
    assert first_fit([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    assert first_fit([], 8) == [] and first_fit([8], 8) == [[0]]
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 20) for _ in range(rng.randint(1, 60))]
        assert first_fit(lengths, 20) == _brute_first_fit(lengths, 20)
    with pytest.raises(ValueError):
        first_fit([9], 8)


DOCS = [(5, 2), (3, 1), (7, 4), (2, 1), (12, 3), (12, 10), (4, 2)]  # seq_len 8: capacity 9 tokens


def test_sft_packing_segments(tmp_path):
    shards = _sft_shards(tmp_path, DOCS)
    ds = SFTDataset(shards, seq_len=8)
    # doc 4 (12 tokens) is cut to 9 and keeps trained tokens; doc 5's first trained token lies beyond the cut.
    assert (ds.num_truncated, ds.num_dropped, ds.num_conversations) == (1, 1, 6)
    lengths = [5, 3, 7, 2, 9, 4]
    assert [it.tolist() for it in ds._items] == first_fit(lengths, 9) == [[0, 1], [2, 3], [4], [5]]
    assert len(ds) == 4 and ds.fill == pytest.approx(sum(lengths) / (4 * 9))
    item = ds[0]
    assert item["doc_ids"].tolist() == [0] * 5 + [1] * 3
    assert item["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    starts = shards.document_starts()
    np.testing.assert_array_equal(item["tokens"], np.concatenate([shards.read(0, 5), shards.read(int(starts[1]), 3)]))
    assert item["mask"].tolist() == [0, 0, 1, 1, 1, 0, 1, 1]

    batch = collate_sft([ds[i] for i in range(len(ds))], seq_len=8)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (4, 8) for k in
                                                              ("input_ids", "labels", "position_ids", "doc_ids")}
    assert all(v.dtype == torch.long for v in batch.values())
    row = {k: v[0].tolist() for k, v in batch.items()}
    tokens = item["tokens"].tolist()
    assert row["input_ids"] == tokens[:7] + [0]
    # Segment 0's last input (position 4) would predict segment 1's <bos>: not trained.
    assert row["labels"] == [-100, tokens[2], tokens[3], tokens[4], -100, tokens[6], tokens[7], -100]
    assert row["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 0]
    assert row["doc_ids"] == [0, 0, 0, 0, 0, 1, 1, -1]
    # No label crosses a segment boundary, anywhere in the batch.
    for b in range(4):
        docs, labels = ds[b]["doc_ids"], batch["labels"][b]  # the item's doc_ids cover the last target too
        for t in range(len(docs) - 1):
            if docs[t] != docs[t + 1]:
                assert labels[t] == IGNORE_INDEX
    assert IGNORE_INDEX == losses.IGNORE_INDEX


def test_sft_drop_and_unpacked(tmp_path):
    shards = _sft_shards(tmp_path, DOCS)
    ds = SFTDataset(shards, seq_len=8, packing=False, overlong="drop")
    assert (ds.num_truncated, ds.num_dropped, ds.num_conversations, len(ds)) == (0, 2, 5, 5)
    assert [len(ds[i]["tokens"]) for i in range(5)] == [5, 3, 7, 2, 4]
    assert all((ds[i]["doc_ids"] == 0).all() for i in range(5))
    truncated = SFTDataset(shards, seq_len=8, packing=False)
    assert len(truncated[4]["tokens"]) == 9 and truncated.num_truncated == 1
    batch = collate_sft([truncated[4]], seq_len=8)
    assert (batch["labels"][0] != IGNORE_INDEX).sum() == 9 - 3  # targets at positions 3..8
    with pytest.raises(DataError, match="overlong"):
        SFTDataset(shards, seq_len=8, overlong="cut")
    with pytest.raises(DataError, match="no conversation .* fits seq_len 3"):
        SFTDataset(_sft_shards(tmp_path / "long", [(5, 2), (6, 1)]), seq_len=3, overlong="drop")


def test_packed_and_unpacked_give_the_same_trained_targets(tmp_path):
    shards = _sft_shards(tmp_path, [(n, 1 + n // 3) for n in (6, 9, 3, 14, 8, 5, 11, 2, 7)])
    packed, single = SFTDataset(shards, 16), SFTDataset(shards, 16, packing=False)
    assert len(packed) < len(single) == 9

    def targets(ds):
        batch = collate_sft([ds[i] for i in range(len(ds))], 16)
        return sorted(batch["labels"][batch["labels"] != IGNORE_INDEX].tolist())

    assert targets(packed) == targets(single)


def test_block_causal_mask():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 0, 0], [0, 1, 2, -1, -1, -1]])
    mask = block_causal_mask(doc_ids)
    assert mask.shape == (3, 1, 6, 6) and mask.dtype == torch.bool
    for b in range(3):
        for q in range(6):
            for k in range(6):
                assert mask[b, 0, q, k] == (k <= q and doc_ids[b, q] == doc_ids[b, k])
    assert mask.diagonal(dim1=-2, dim2=-1).all()  # every row attends at least to itself
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())


def test_packed_batch_matches_each_sample_alone(tmp_path):
    """Block-diagonal attention and restarting positions: a packed row gives each conversation the logits
    (and so the loss) it gets alone."""
    shards = _sft_shards(tmp_path, [(9, 3), (6, 2), (12, 5), (5, 1)])
    packed = SFTDataset(shards, 16)
    single = SFTDataset(shards, 16, packing=False)
    assert [it.tolist() for it in packed._items] == [[0, 1], [2, 3]]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64)
    model = Transformer(cfg).float().eval()

    batch = collate_sft([packed[i] for i in range(len(packed))], 16)
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"],
                       attn_mask=block_causal_mask(batch["doc_ids"]))  # (2, 16, V)
        alone = [model(torch.from_numpy(single[c]["tokens"][None])) for c in range(4)]  # (1, n, V) each
    for row, conversations in enumerate([[0, 1], [2, 3]]):
        for d, c in enumerate(conversations):
            where = batch["doc_ids"][row] == d  # this conversation's inputs in the packed row
            n = int(where.sum())
            torch.testing.assert_close(logits[row][where], alone[c][0, :n], atol=1e-5, rtol=1e-4)

    unpacked = collate_sft([single[c] for c in range(4)], 16)
    with torch.no_grad():
        loss_packed = losses.token_cross_entropy(logits, batch["labels"])
        loss_unpacked = losses.token_cross_entropy(model(unpacked["input_ids"]), unpacked["labels"])
    torch.testing.assert_close(loss_packed, loss_unpacked, atol=1e-5, rtol=1e-5)
