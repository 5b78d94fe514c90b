"""optimizer.type "muon": DeepSpeed's Muon for the blocks' matrices and AdamW for the rest; ZeRO-0/2/3 agree on 2
ranks, a stopped run resumes exactly, and a checkpoint of another optimizer is refused before anything is written."""

from __future__ import annotations

import pytest
import torch

from conftest import copy_run, expect_user_error, launch, tiny_train_config, train_losses

from astrai_ds.config.base import from_dict
from astrai_ds.config.train import OptimizerConfig
from astrai_ds.model import ModelConfig, Transformer
from astrai_ds.training.engine import muon_param_groups

MUON = dict(optimizer__type="muon", optimizer__grad_clip=0.0, micro_batch_size=8, grad_accum_steps=1)


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tied):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                    max_seq_len=32, tie_embeddings=tied))
    opt = from_dict(OptimizerConfig, {"type": "muon", "lr": 1e-3, "muon_lr": 0.05, "weight_decay": 0.1})
    groups = muon_param_groups(model, opt)
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {(g["use_muon"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in groups}
    muon = by_kind[(True, 0.1)]
    assert muon == sorted(n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("layers."))
    assert len(muon) == 2 * 7  # wq wk wv wo w1 w2 w3 of each block
    head = ["embed.tok_embeddings.weight"] + ([] if tied else ["head.output.weight"])
    assert by_kind[(False, 0.1)] == head
    assert by_kind[(False, 0.0)] == sorted(n for n, p in model.named_parameters() if p.ndim == 1)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 0.05]  # AdamW's first: the lr the log shows is `lr`
    assert all(p.use_muon == (n.startswith("layers.") and p.ndim == 2) for n, p in model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.fixture(scope="module")
def muon_runs(trained):
    return {name: trained(f"{name}.json", **MUON) for name in ("zero0", "zero2", "zero3")}


@pytest.mark.multiproc
def test_zero_stages_agree_with_muon(muon_runs, trained):
    """Without ZeRO (the full matrices in Muon's own step), ZeRO-2 (Muon on each matrix's gathered gradient before
    partitioning) and ZeRO-3 give the same losses; and Muon trains differently from AdamW on the same batches."""
    losses = {name: train_losses(run) for name, run in muon_runs.items()}
    assert sorted(losses["zero0"]) == list(range(1, 7))
    for name in ("zero2", "zero3"):
        for step, loss in losses["zero0"].items():
            assert losses[name][step] == pytest.approx(loss, rel=1e-4), (name, step)
    assert losses["zero0"][6] < losses["zero0"][1]
    adamw = train_losses(trained("zero2.json"))  # the same global batches, as 4 x 2 (shared with test_multiproc)
    assert adamw[1] == pytest.approx(losses["zero0"][1], rel=1e-6)  # the same first batch and weights
    assert abs(adamw[6] - losses["zero0"][6]) > 1e-3


@pytest.mark.multiproc
def test_muon_resumes_exactly_and_another_optimizer_is_refused(workspace, muon_runs, tmp_path):
    """Resumed from step 3 of the ZeRO-2 run, the losses equal the uninterrupted run's (Muon's momentum and AdamW's
    moments come back); the same checkpoint resumed with optimizer.type adamw stops before anything is written."""
    run = copy_run(muon_runs["zero2"], tmp_path, 3)
    config = tiny_train_config(workspace, tmp_path, **MUON)
    proc = launch(config, ds_config="zero2.json")
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    whole, resumed = train_losses(muon_runs["zero2"]), train_losses(run)
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6), step
    files = sorted(p.name for p in run.iterdir())
    proc = launch(config, ds_config="zero2.json", sets=["optimizer.type=adamw", "max_steps=8"], check=False)
    expect_user_error(proc, "optimizer.type muon, this run adamw")
    assert sorted(p.name for p in run.iterdir()) == files
