"""The loss of a global batch is its summed token loss divided by its trained tokens, however the batch is
split into micro-batches, accumulation steps and ranks; throughput counts the non-padding tokens."""

from __future__ import annotations

import json

import pytest

from conftest import launch, read_metrics, tiny_train_config

pytestmark = pytest.mark.multiproc

LONG = ("Monday comes before Tuesday, and Tuesday comes before Wednesday; a week has seven days, and "
        "a common year has twelve months.")


@pytest.fixture(scope="module")
def uneven_sft(workspace, tmp_path_factory):
    """32 conversations, in order: per 16, 8 with a long answer, then 8 with a one-character answer. So a micro-
    batch holds either hundreds of trained tokens or a handful."""
    from astrai_ds.data.prepare import prepare_sft

    root = tmp_path_factory.mktemp("uneven")
    records = []
    for i in range(32):
        answer = LONG if i % 16 < 8 else str(i % 10)
        records.append({"messages": [{"role": "user", "content": f"Question {i}?"},
                                     {"role": "assistant", "content": answer}]})
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare_sft([root / "sft.jsonl"], workspace / "tokenizer", root / "data", 64, workers=1, progress=False)
    return root


def run(workspace, uneven_sft, tmp_path, micro: int, accum: int, nproc: int) -> list[dict]:
    out = tmp_path / f"m{micro}a{accum}n{nproc}"
    data = str(uneven_sft / "data")
    cfg = tiny_train_config(workspace, out, model=None, stage={"type": "sft"}, data__path=data, data__eval_path=data,
                            data__shuffle=False, data__packing=False, data__eval_batches=16 // (micro * nproc),
                            micro_batch_size=micro, grad_accum_steps=accum, max_steps=2, save_interval=2,
                            eval_interval=2, log_interval=1)
    cfg_dict = json.loads(cfg.read_text())
    cfg_dict["model"] = str(workspace / "model_tiny.json")
    cfg.write_text(json.dumps(cfg_dict))
    launch(cfg, ds_config="zero2.json", nproc=nproc)
    return read_metrics(out / "run")


def test_loss_and_gradient_do_not_depend_on_the_split(workspace, uneven_sft, tmp_path):
    from astrai_ds.data.datasets import SFTDataset
    from astrai_ds.data.shards import TokenShards

    runs = {split: run(workspace, uneven_sft, tmp_path, *split) for split in [(16, 1, 1), (8, 2, 1), (4, 2, 2)]}
    train = {split: [r for r in records if "train/loss" in r] for split, records in runs.items()}
    evals = {split: [r["eval/loss"] for r in records if "eval/loss" in r] for split, records in runs.items()}
    assert [r["step"] for r in train[(16, 1, 1)]] == [1, 2] and len(evals[(16, 1, 1)]) == 2
    for split in [(8, 2, 1), (4, 2, 2)]:
        for ref, got in zip(train[(16, 1, 1)], train[split]):
            # fp32; only the order of the sums differs between the splits
            assert got["train/loss"] == pytest.approx(ref["train/loss"], rel=1e-5), (split, ref["step"])
            assert got["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-4), (split, ref["step"])
            assert got["train/tokens_seen"] == ref["train/tokens_seen"]
        assert evals[split] == pytest.approx(evals[(16, 1, 1)], rel=1e-5), split
    # tokens_seen: the non-padding inputs of the 32 conversations (a conversation of n tokens has n - 1 inputs)
    dataset = SFTDataset(TokenShards(uneven_sft / "data"), 64, packing=False, overlong="truncate")
    assert train[(16, 1, 1)][-1]["train/tokens_seen"] == sum(len(dataset[i]["tokens"]) - 1 for i in range(32))
    assert train[(16, 1, 1)][0]["train/mfu"] > 0
