"""Tensor-parallel inference (DeepSpeed AutoTP): a model sharded over 2 CPU ranks gives the unsharded model's logits
and greedy tokens; bad set-ups are refused with a message saying what to do."""

from __future__ import annotations

import builtins
import json
import time

import pytest
import torch

from conftest import ROOT, free_port, run_ranks
from tp_generate import run_cases

from astrai_ds.data.tokenizer import Tokenizer
from astrai_ds.errors import UserError
from astrai_ds.inference.ds_inference import check_tensor_parallel, tensor_parallel
from astrai_ds.model import ModelConfig, Transformer
from astrai_ds.model.io import load_model_folder, save_model_folder

SCRIPT = ROOT / "tests" / "inference" / "tp_generate.py"
# 6 query heads over 2 key/value heads: each rank keeps 3 query heads and the 1 key/value head they share.
CFG = dict(vocab_size=512, dim=96, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=256, max_seq_len=128,
           tie_embeddings=True)


@pytest.fixture(scope="module")
def model_dir(workspace, tmp_path_factory):
    torch.manual_seed(0)
    # A large init makes a random model's argmax depend on the context, so a wrong shard changes the tokens.
    model = Transformer(ModelConfig(**CFG, init_std=0.2)).eval()
    return save_model_folder(model, Tokenizer.load(workspace / "tokenizer"), tmp_path_factory.mktemp("tp") / "model")


@pytest.fixture(scope="module")
def reference(model_dir) -> dict:
    """The unsharded model, in this process."""
    model, tokenizer = load_model_folder(model_dir)
    return run_cases(model, tokenizer)


@pytest.fixture(scope="module")
def tp_ranks(model_dir, tmp_path_factory) -> list[dict]:
    """2 CPU ranks with tp 2 (started directly; `generate --tp` and `serve --tp` go through the launcher): what
    each rank wrote."""
    out = tmp_path_factory.mktemp("tp_out")
    t0 = time.perf_counter()
    proc = run_ranks(str(SCRIPT), ["--model", str(model_dir), "--out", str(out)], 2, free_port(),
                     extra_env={"OMP_NUM_THREADS": "1"})
    print(f"tp=2 launch: {time.perf_counter() - t0:.1f}s")
    assert not proc.shm_left, f"shared-memory buffers left in /dev/shm: {proc.shm_left}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.multiproc
def test_tp2_logits_equal_unsharded(tp_ranks, reference):
    """Each rank's logits are the whole vocabulary's (the head is not sharded) and equal the unsharded model's."""
    expected = torch.tensor(reference["logits"])
    for r in tp_ranks:
        torch.testing.assert_close(torch.tensor(r["logits"]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.multiproc
def test_tp2_greedy_tokens_equal_unsharded(tp_ranks, reference):
    assert reference["errors"] == [None] * 4 and all(len(t) > 0 for t in reference["tokens"])
    assert len({tuple(t) for t in reference["tokens"]}) > 1  # the prompts lead to different tokens
    for r in tp_ranks:
        assert r["errors"] == reference["errors"]
        assert r["tokens"] == reference["tokens"]
        assert r["texts"] == reference["texts"]


@pytest.mark.multiproc
def test_tp2_shards_blocks_only(tp_ranks):
    """q/k/v and w1/w3 keep half their output rows (whole heads); the head stays whole and tied to the embedding;
    the launcher's LOCAL_SIZE is what DeepSpeed's shared-memory all-reduce needs."""
    head_dim = CFG["dim"] // CFG["n_heads"]
    for rank, r in enumerate(tp_ranks):
        assert (r["rank"], r["world"], r["local_size"]) == (rank, 2, "2")
        assert r["wq_rows"] == 3 * head_dim and r["wk_rows"] == 1 * head_dim
        assert r["w1_rows"] == CFG["ffn_dim"] // 2
        assert r["head_rows"] == CFG["vocab_size"] and r["tied"]


# ---------------------------------------------------------------- refused set-ups (no launch)


def test_tp_must_divide_kv_heads():
    cfg = ModelConfig(**{**CFG, "n_kv_heads": 3})
    with pytest.raises(UserError, match=r"--tp 2 does not divide .*n_kv_heads 3.*use --tp 1 or 3"):
        check_tensor_parallel(cfg, 2, torch.float32)
    with pytest.raises(UserError, match="positive integer"):
        check_tensor_parallel(cfg, 0, torch.float32)


def test_world_size_must_equal_tp():
    with pytest.raises(UserError, match=r"needs exactly 2 processes, but 4 .*deepspeed --num_gpus 2 --module "
                                        r"astrai_ds generate --tp 2"):
        check_tensor_parallel(ModelConfig(**CFG), 2, torch.float32, world_size=4)


def test_dtype_the_accelerator_does_not_run():
    with pytest.raises(UserError, match="does not run fp16 .*use fp32 or bf16"):
        check_tensor_parallel(ModelConfig(**CFG), 2, torch.float16, supported_dtypes=[torch.float32, torch.bfloat16])


def test_tp_in_a_single_process_says_how_to_launch():
    model = Transformer(ModelConfig(**CFG))
    with pytest.raises(UserError, match=r"single one; start 2 processes.*deepspeed --num_gpus 2 --module "
                                        r"astrai_ds generate --tp 2"):
        tensor_parallel(model, 2, torch.float32)
    assert not torch.distributed.is_initialized()


def test_tp1_only_casts():
    model = Transformer(ModelConfig(**CFG))
    assert tensor_parallel(model, 1, torch.bfloat16) is model
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16 and not model.training


def test_missing_transformers_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    with pytest.raises(UserError, match=r"pip install 'astrai_ds\[hf\]'"):
        tensor_parallel(Transformer(ModelConfig(**CFG)), 2, torch.float32)
