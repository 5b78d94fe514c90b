"""Real multi-process training on 2 CPU ranks (gloo): ZeRO parity, exact resume, export, sharded construction and
resume on another number of ranks. The ranks are started directly (conftest `launch`), as the `deepspeed` launcher
starts them; `test_training_lowers_eval_loss` goes through the launcher itself."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import (ROOT, VENV_BIN, copy_run, free_port, launch, read_metrics, run_cmd,
                      run_ranks, tiny_train_config, train_losses, unavailable)

pytestmark = pytest.mark.multiproc

# fp32 on CPU: ZeRO stages differ only in how gradients are reduced (all-reduce vs reduce-scatter) and
# where the optimizer step runs, so losses agree to float32 round-off accumulated over a few steps.
PARITY_RTOL = 1e-4


@pytest.fixture(scope="module")
def zero_runs(trained):
    """The test config trained on 2 ranks under each ZeRO config (shared with the tests that continue them)."""
    return {name: trained(f"{name}.json") for name in ("zero0", "zero2", "zero3", "zero3_offload")}


def test_zero_stages_agree(zero_runs, trained):
    """No ZeRO, ZeRO-2, ZeRO-3 and ZeRO-3 with optimizer and parameters offloaded to the host (DeepSpeed's
    CPU Adam) give the same losses on the same data."""
    losses = {name: train_losses(run) for name, run in zero_runs.items()}
    assert sorted(losses["zero0"]) == list(range(1, 7))
    for name in ("zero2", "zero3", "zero3_offload"):
        for step, loss in losses["zero0"].items():
            assert losses[name][step] == pytest.approx(loss, rel=PARITY_RTOL), (name, step)
    # the runs did train: the loss moved
    assert losses["zero0"][6] < losses["zero0"][1]
    # the loss from the whole logits (fused_loss false) gives what the chunked head loss gives
    unfused = train_losses(trained("zero3.json", fused_loss=False))
    for step, loss in losses["zero3"].items():
        assert unfused[step] == pytest.approx(loss, rel=1e-5), step
    # and report the same gradient norm (ZeRO-0 in fp32 has no DeepSpeed norm: the trainer takes its own)
    norms = {name: {r["step"]: r["train/grad_norm"] for r in read_metrics(run) if "train/grad_norm" in r}
             for name, run in zero_runs.items()}
    for name in ("zero2", "zero3", "zero3_offload"):
        for step, norm in norms["zero0"].items():
            assert math.isfinite(norm) and norms[name][step] == pytest.approx(norm, rel=1e-3), (name, step)


@pytest.mark.async_io
def test_zero3_nvme_offload_agrees_and_resumes(workspace, tmp_path):
    """ZeRO-Infinity (zero3_nvme.json): the optimizer states of each rank's large sub-group live in swap files in
    the run folder, written and read through DeepSpeed's async_io op (libaio) around every step; the small one
    (the norms, under one aio block) stays in memory. The losses agree with ZeRO-3 offloading to host memory (the
    same CPU Adam), a run stopped after step 3 resumes to the uninterrupted run's losses (both kinds of sub-group
    and Adam's step count come back), and the swap folder is gone when a run ends."""
    from astrai_ds.config.deepspeed import check_nvme_offload, load_ds_config
    from astrai_ds.errors import ConfigError

    try:
        check_nvme_offload(load_ds_config("zero3_nvme.json")[0], "zero3_nvme.json")
    except ConfigError as e:
        unavailable(f"{e} (scripts/install_cluster_deps.sh installs libaio-dev)")
    # Compiled once per machine (astrai_ds.extensions; about 7 minutes on 2 cores), by the session's background build
    # (conftest) or else here, rather than inside a launch with the launch's time limit.
    run_cmd([str(VENV_BIN / "python"), "-c", "from deepspeed.accelerator import get_accelerator; "
             "get_accelerator().create_op_builder('AsyncIOBuilder').load()"], timeout=1800)
    model = tmp_path / "model.json"  # about 1M parameters per rank: above DeepSpeed's 1 MiB swap threshold
    model.write_text(json.dumps({"vocab_size": "auto", "dim": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                 "ffn_dim": 704, "max_seq_len": 128, "tie_embeddings": True}))
    common = dict(model=str(model), schedule__total_steps=6)
    launch(tiny_train_config(workspace, tmp_path / "host", **common), ds_config="zero3_offload.json")
    launch(tiny_train_config(workspace, tmp_path / "full", **common), ds_config="zero3_nvme.json")
    split = tiny_train_config(workspace, tmp_path / "split", **common)
    launch(split, ds_config="zero3_nvme.json", sets=["max_steps=3"])
    assert not (tmp_path / "split" / "run" / "nvme_offload").exists()
    swapped = tmp_path / "split" / "run" / "global_step3" / "offloaded_tensors"
    assert sorted(p.name for p in swapped.iterdir()) == ["rank00", "rank01"]
    assert all(any(folder.rglob("*.tensor.swp")) for folder in swapped.iterdir())
    assert "resumed from" in launch(split, ds_config="zero3_nvme.json").stdout
    host, full = train_losses(tmp_path / "host" / "run"), train_losses(tmp_path / "full" / "run")
    resumed = train_losses(tmp_path / "split" / "run")
    assert sorted(full) == list(range(1, 7)) and full[6] < full[1]
    for step in range(1, 7):
        assert full[step] == pytest.approx(host[step], rel=PARITY_RTOL), step
        assert resumed[step] == full[step], step
    ds = json.loads((tmp_path / "full" / "run" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "nvme"
    assert not (tmp_path / "full" / "run" / "nvme_offload").exists()
    # Export reads the swapped fp32 weights from the checkpoint's swap files: the model equals the host-offload
    # run's (the same CPU Adam on the same data; consolidated by DeepSpeed's own zero_to_fp32), and is no longer
    # the initial one; the same run exports to GGUF.
    import gguf
    import numpy as np

    from astrai_ds.convert.export import consolidated_state_dict, export_run, run_model
    from astrai_ds.convert.gguf import export_gguf
    from astrai_ds.model.io import load_model_folder

    from deepspeed.utils.zero_to_fp32 import get_optim_files, parse_optim_states

    last = tmp_path / "full" / "run" / "global_step6"
    groups = parse_optim_states(get_optim_files(str(last)), str(last))[2]
    assert any(g.numel() == 0 for rank in groups for g in rank)  # ZeRO's own files lack the swapped weights
    nvme_state = consolidated_state_dict(tmp_path / "full" / "run", "global_step6")
    host_state = consolidated_state_dict(tmp_path / "host" / "run", "global_step6")
    first = consolidated_state_dict(tmp_path / "split" / "run", "global_step3")
    assert sorted(nvme_state) == sorted(host_state)
    for name, value in host_state.items():
        torch.testing.assert_close(nvme_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(first[name], nvme_state[name]) for name in nvme_state)
    export_run(tmp_path / "full" / "run", tmp_path / "model")
    model, _ = load_model_folder(tmp_path / "model", dtype=torch.float32)
    exported = {name: p.detach() for name, p in model.state_dict().items()}
    for name, value in exported.items():
        torch.testing.assert_close(value, nvme_state[name].to(value.dtype).view_as(value), rtol=0, atol=0, msg=name)
    export_gguf(*run_model(tmp_path / "full" / "run"), tmp_path / "model.gguf", "f32")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    embedding = exported["embed.tok_embeddings.weight"].numpy()
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data), embedding)


def test_run_folder_layout(zero_runs):
    run = zero_runs["zero3"]
    for name in ("train_config.json", "model_config.json", "ds_config.json", "tokenizer.json", "metrics.jsonl",
                 "latest", "global_step6/COMPLETE"):
        assert (run / name).exists(), name
    assert (run / "latest").read_text().strip() == "global_step6"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    record = read_metrics(run)[-2]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/mfu"):
        assert tag in record or any(tag in r for r in read_metrics(run)), tag
    evals = [r["eval/loss"] for r in read_metrics(run) if "eval/loss" in r]
    assert len(evals) == 3 and all(math.isfinite(x) for x in evals)  # steps 0, 3, 6
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 4 * 2 * 2 and ds["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("name", ["zero0", "zero2", "zero3"])
def test_export_reproduces_trained_logits(zero_runs, name, tmp_path):
    """The exported safetensors folder gives the same logits as the DeepSpeed engine that trained it."""
    from astrai_ds.convert.export import export_run
    from astrai_ds.model.io import load_model_folder

    run = zero_runs[name]
    model_dir = export_run(run, tmp_path / "model")  # the command itself: tests/cli/test_export.py
    model, _ = load_model_folder(model_dir)
    saved = engine_logits(run, tmp_path)
    with torch.no_grad():
        logits = model(saved["input_ids"])
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-4, atol=1e-4)


def engine_logits(run, tmp_path) -> dict:
    """The logits of `run`'s latest checkpoint loaded into a DeepSpeed engine on 2 ranks (engine_logits.py)."""
    out = tmp_path / "engine_logits.pt"
    run_ranks(str(ROOT / "tests" / "training" / "engine_logits.py"), ["--run", str(run), "--out", str(out)], 2,
              free_port())
    return torch.load(out)


def test_resume_continues_exactly(workspace, tmp_path):
    """Stopped after 4 of 8 steps and resumed with resume "auto", the run's losses equal the uninterrupted
    run's: weights, optimizer, LR schedule, data order and RNG all come back from the checkpoint."""
    common = dict(max_steps=8, save_interval=4, schedule__total_steps=8, precision="auto")
    full = tiny_train_config(workspace, tmp_path / "full", **common)
    launch(full)
    split = tiny_train_config(workspace, tmp_path / "split", **common)
    launch(split, sets=["max_steps=4"])
    first = train_losses(tmp_path / "split" / "run")
    assert sorted(first) == [1, 2, 3, 4]
    proc = launch(split)  # resume "auto": continues from global_step4
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    expected, resumed = train_losses(tmp_path / "full" / "run"), train_losses(tmp_path / "split" / "run")
    for step in range(1, 9):
        assert resumed[step] == expected[step], step


def test_pure_bf16_resumes_exactly_and_exports(workspace, tmp_path):
    """zero2_pure_bf16.json (bf16 weights, gradients and Adam state, no fp32 master copy) trains, resumes
    exactly like the mixed-precision configs, and exports weights that reproduce the engine's logits."""
    from astrai_ds.convert.export import export_run
    from astrai_ds.model.io import load_model_folder

    # the run continued from its checkpoint of step 3 (the stop itself: test_resume_continues_exactly)
    full = tiny_train_config(workspace, tmp_path / "full", precision="bf16")
    launch(full, ds_config="zero2_pure_bf16.json")
    run = tmp_path / "full" / "run"
    split = tiny_train_config(workspace, tmp_path / "split", precision="bf16")
    copy_run(run, tmp_path / "split", 3)
    assert "at step 3" in launch(split, ds_config="zero2_pure_bf16.json").stdout
    expected, resumed = train_losses(run), train_losses(tmp_path / "split" / "run")
    assert [resumed[s] for s in range(1, 7)] == [expected[s] for s in range(1, 7)]
    assert expected[6] < expected[1]
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["bf16"]["bf16_master_weights_and_grads"] and ds["zero_optimization"]["overlap_comm"] is False

    model, _ = load_model_folder(export_run(run, tmp_path / "model", dtype="bf16"), dtype=torch.bfloat16)
    saved = engine_logits(run, tmp_path)
    with torch.no_grad():
        logits = model(saved["input_ids"]).float()
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-2, atol=1e-2)  # bf16 round-off


def test_training_lowers_eval_loss(workspace, tmp_path):
    cfg = tiny_train_config(workspace, tmp_path, max_steps=60, eval_interval=30, save_interval=60, log_interval=10,
                            grad_accum_steps=1, micro_batch_size=8, precision="auto",
                            schedule__warmup_steps=6, optimizer__lr=0.005)
    launch(cfg, launcher="deepspeed")  # PT through the real launcher
    evals = [r["eval/loss"] for r in read_metrics(tmp_path / "run") if "eval/loss" in r]
    assert evals[-1] < 0.5 * evals[0], evals


@pytest.mark.parametrize("tied", [True, False])
def test_zero3_builds_sharded_with_the_unsharded_weights(workspace, tmp_path, tied):
    """Under ZeRO-3 the model is built inside zero.Init: right after construction no rank holds a whole
    parameter, the ranks' shards add up to the model, and the gathered weights equal an unsharded build from
    the same seed; a model folder (stage.init_from) loads into it exactly."""
    from astrai_ds.config.model import ModelConfig
    from astrai_ds.data.tokenizer import Tokenizer
    from astrai_ds.model import Transformer
    from astrai_ds.model.io import save_model_folder
    from astrai_ds.training.engine import param_groups

    cfg_path = tmp_path / "model.json"
    cfg_path.write_text(json.dumps({"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                    "ffn_dim": 176, "max_seq_len": 64, "tie_embeddings": tied}))
    cfg = ModelConfig.load(cfg_path)
    torch.manual_seed(1234)
    reference = Transformer(cfg)
    folder_model = Transformer(cfg)  # other weights (the RNG has moved on): what init_from must load
    folder = save_model_folder(folder_model, Tokenizer.load(workspace / "tokenizer"), tmp_path / "folder")
    outs = {None: tmp_path / "built_seed.pt", folder: tmp_path / "built_folder.pt"}
    run_ranks(str(ROOT / "tests" / "training" / "sharded_build.py"), ["--model-config", str(cfg_path), "--out",
              str(outs[None]), "--init-from", str(folder), "--init-out", str(outs[folder])], 2, free_port())
    for init_from, expected in ((None, reference), (folder, folder_model)):
        built = torch.load(outs[init_from])
        assert built["tied"] == tied
        decay = {id(p) for p in param_groups(expected, 0.1)[0]["params"]}  # weight decay on the same matrices
        assert built["decay"] == sorted(n for n, p in expected.named_parameters() if id(p) in decay)
        names = dict(expected.named_parameters())
        assert set(built["full"]) == set(names)
        for name, p in names.items():
            assert all(rank["held"][name] == 0 for rank in built["ranks"]), name  # partitioned, not whole
            assert sum(rank["shard"][name] for rank in built["ranks"]) >= p.numel()  # padded to the ranks
            torch.testing.assert_close(built["full"][name], p.detach(), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("ds_config, before, after", [("zero2.json", 2, 1), ("zero3.json", 2, 1), ("zero3.json", 1, 2)])
def test_resume_on_another_number_of_ranks(workspace, trained, tmp_path, ds_config, before, after):
    """ZeRO-2 and ZeRO-3 checkpoints written by 2 ranks resume on 1, and a ZeRO-3 one written by 1 resumes on 2:
    resume "auto" converts the checkpoint to DeepSpeed's universal format once, says so, and the run continues
    with the uninterrupted run's losses (the same global batch of 16 and the same samples in the same order). The
    converted copy is removed once the resumed run has saved a checkpoint of its own. (Under ZeRO-3 this needs
    `repair_zero3_universal_load`: without it the losses drift apart from step 5.)"""
    micro = {1: 8, 2: 4}  # micro x accumulation (2) x ranks = 16 either way
    full = trained(ds_config)  # the test config on 2 ranks, micro-batch 4, checkpoints at steps 3 and 6
    split = tiny_train_config(workspace, tmp_path / "split")
    if before == 2:
        copy_run(full, tmp_path / "split", 3)
    else:
        launch(split, ds_config=ds_config, nproc=before, sets=["max_steps=3", f"micro_batch_size={micro[before]}",
                                                               "schedule.total_steps=6"])
    proc = launch(split, ds_config=ds_config, nproc=after, sets=[f"micro_batch_size={micro[after]}"])
    run = tmp_path / "split" / "run"
    assert f"(written by {before} ranks) to a universal checkpoint" in proc.stdout
    assert f"resumed from {run / 'universal' / 'global_step3'} at step 3" in proc.stdout
    expected, resumed = train_losses(full), train_losses(run)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        # another number of ranks sums the same gradients in another order: float32 round-off
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4), step
    seen = {r["step"]: r["train/tokens_seen"] for r in read_metrics(run) if "train/tokens_seen" in r}
    assert seen[6] == 6 * 16 * 64  # no sample repeated or skipped across the change
    assert not (run / "universal").exists()
    marker = json.loads((run / "global_step6" / "COMPLETE").read_text())
    assert marker["world_size"] == after
