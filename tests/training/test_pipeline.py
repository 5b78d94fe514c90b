"""Pipeline stages on 2 and 4 CPU ranks (started directly, as the `deepspeed` launcher starts them): a 2-stage
pipeline trains exactly like the plain model on the same data and seed (PT and SFT, tied and untied, with activation
checkpointing, with data parallelism), its checkpoints resume and export to the same model folder, and a wrong
combination stops with our message."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import expect_user_error, launch, read_metrics, tiny_train_config, train_losses

pytestmark = pytest.mark.multiproc

# fp32 on CPU: the same operations in the same order, split over two processes. The losses agree to float32
# round-off (the tied embedding's gradient is the sum of two parts added on different ranks).
RTOL = 1e-5


def eval_losses(run) -> dict[int, float]:
    return {r["step"]: r["eval/loss"] for r in read_metrics(run) if "eval/loss" in r}


def export(run, out):
    """The weights `astrai-ds export` writes for the run (export_run, in this process)."""
    from safetensors.torch import load_file

    from astrai_ds.convert.export import export_run

    return load_file(export_run(run, out) / "model.safetensors")


def plain(config, **kw):
    """The plain model on one rank without ZeRO: the same global batch as 2 stages x 1 replica."""
    return launch(config, ds_config="zero0.json", nproc=1, **kw)


def pipelined(config, nproc=2, **kw):
    return launch(config, ds_config="pipeline.json", nproc=nproc, **kw)


def assert_same_losses(a, b, steps):
    losses_a, losses_b = train_losses(a), train_losses(b)
    assert sorted(losses_a) == list(range(1, steps + 1)) and sorted(losses_b) == sorted(losses_a)
    for step, loss in losses_a.items():
        assert losses_b[step] == pytest.approx(loss, rel=RTOL), step
    assert eval_losses(b) == pytest.approx(eval_losses(a), rel=RTOL)
    assert losses_a[steps] < losses_a[1]  # it trained


def assert_same_weights(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def untied_model(workspace):
    path = workspace / "model_tiny_untied.json"
    path.write_text(json.dumps({"vocab_size": "auto", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                "ffn_dim": 176, "max_seq_len": 128, "tie_embeddings": False}))
    return path


PIPE = {"parallel": {"pipeline_stages": 2}}


@pytest.mark.parametrize("tied", [True, False])
def test_pipeline_pt_equals_plain_and_exports_the_same_model(trained, untied_model, tmp_path, tied):
    """PT on 2 stages gives the plain model's losses and eval losses step for step, from the same seed (each stage
    keeps its layers of the plain model's initialisation), and its checkpoint exports to the same weights."""
    over = {} if tied else {"model": str(untied_model)}
    # the same global batch as 2 stages x 1 replica, its loss from the whole logits as the last stage computes it
    plain_run = trained("zero0.json", nproc=1, fused_loss=False, **over)
    pipe_run = trained("pipeline.json", **PIPE, **over)
    assert_same_losses(plain_run, pipe_run, 6)
    weights = export(pipe_run, tmp_path / "pipe_model")
    assert_same_weights(export(plain_run, tmp_path / "plain_model"), weights)
    marker = json.loads((pipe_run / "global_step6" / "COMPLETE").read_text())
    assert marker["pipeline_stages"] == 2 and marker["zero_stage"] == 1


def test_pipeline_resumes_exactly(workspace, trained, tmp_path):
    """Stopped at step 3 of 6 and resumed, a pipeline run's losses equal the uninterrupted plain run's; a plain run
    cannot resume from its checkpoint and says why."""
    piped = tiny_train_config(workspace, tmp_path / "pipe", **PIPE)
    proc = pipelined(piped, sets=["max_steps=3", "schedule.total_steps=6"])  # the stopped run's learning rates
    assert "2 pipeline stages" in proc.stdout and "x dp 1 = 8 samples" in proc.stdout
    proc = pipelined(piped)
    assert "resumed from" in proc.stdout and "at step 3" in proc.stdout
    assert_same_losses(trained("zero0.json", nproc=1, fused_loss=False), tmp_path / "pipe" / "run", 6)
    proc = plain(piped, check=False, sets=["parallel.pipeline_stages=1"])
    expect_user_error(proc, "2 pipeline stages, this run 1", "astrai-ds export")


@pytest.fixture(scope="module")
def sft_data(workspace, tmp_path_factory):
    """SFT shards of the built-in corpus, and an eval set of 3 conversations: its micro-batches are smaller than
    training's, so the pipeline sees another shape between training and evaluation."""
    from astrai_ds.data.prepare import prepare_sft

    root = tmp_path_factory.mktemp("pipe_sft")
    lines = (workspace / "corpus" / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    (root / "eval.jsonl").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    tok = workspace / "tokenizer"
    prepare_sft([workspace / "corpus" / "sft.jsonl"], tok, root / "sft", 64, workers=1, progress=False)
    prepare_sft([root / "eval.jsonl"], tok, root / "sft_eval", 64, workers=1, progress=False)
    return root


def test_pipeline_sft_with_activation_checkpointing_from_a_pipeline_export(workspace, trained, sft_data, tmp_path):
    """A PT pipeline run is exported; SFT (packed rows, attention kept inside each conversation) starts from that
    folder on the plain model and on 2 stages that recompute each block in backward: the same losses."""
    export(trained("pipeline.json", **PIPE), tmp_path / "pt_model")
    over = dict(model=None, stage={"type": "sft", "init_from": str(tmp_path / "pt_model")},
                data={"path": str(sft_data / "sft"), "eval_path": str(sft_data / "sft_eval"), "seq_len": 64,
                      "packing": True, "eval_batches": 1})
    base = tiny_train_config(workspace, tmp_path / "plain", **over)
    plain(base)
    piped = tiny_train_config(workspace, tmp_path / "pipe", parallel={"pipeline_stages": 2},
                              activation_checkpointing=True, **over)
    pipelined(piped)
    assert_same_losses(tmp_path / "plain" / "run", tmp_path / "pipe" / "run", 6)


def test_pipeline_with_data_parallel_replicas(workspace, trained, tmp_path):
    """4 ranks = 2 stages x 2 replicas, layers split evenly by count: the same losses as the plain model on 2
    data-parallel ranks (the sampler, batch sizes and token counts follow the replicas, not the ranks)."""
    piped = tiny_train_config(workspace, tmp_path / "pipe",
                              parallel={"pipeline_stages": 2, "partition_method": "uniform"})
    proc = pipelined(piped, nproc=4)
    assert "x dp 2 = 16 samples" in proc.stdout
    assert_same_losses(trained("zero0.json"), tmp_path / "pipe" / "run", 6)  # ZeRO-0 on 2 ranks
    tokens = [r["train/tokens_seen"] for r in read_metrics(tmp_path / "pipe" / "run") if "train/tokens_seen" in r]
    assert tokens[-1] == 6 * 16 * 64  # every sample counted once, not once per stage


def test_pipeline_with_zero2_stops_with_our_message(workspace, tmp_path):
    config = tiny_train_config(workspace, tmp_path, parallel={"pipeline_stages": 2})
    proc = launch(config, ds_config="zero2.json", check=False)
    expect_user_error(proc, "ZeRO stage 2 does not combine with pipeline stages", "pipeline.json")
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("global_step*"))
