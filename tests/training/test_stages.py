"""SFT and DPO on 2 CPU ranks, initialised from an exported PT model: the uninterrupted SFT and DPO runs go through
the real `deepspeed` launcher, the others start their ranks directly."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import (copy_run, expect_user_error, launch, read_metrics, run_python, tiny_train_config,
                      train_in_process, train_losses)

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def stages(workspace, tmp_path_factory):
    """A PT model trained for a few steps and exported, plus SFT and DPO shards of the built-in corpus."""
    from astrai_ds.convert.export import export_run
    from astrai_ds.data.prepare import prepare_dpo, prepare_sft

    root = tmp_path_factory.mktemp("stages")
    pt = tiny_train_config(workspace, root / "pt", max_steps=4, save_interval=4)
    run_python("train.py", ["--config", str(pt)])
    export_run(root / "pt" / "run", root / "pt_model")
    corpus, tok = workspace / "corpus", workspace / "tokenizer"
    prepare_sft([corpus / "sft.jsonl"], tok, root / "sft_data", 64, workers=1, progress=False)
    prepare_dpo([corpus / "dpo.jsonl"], tok, root / "dpo_data", 64, workers=1, progress=False)
    return root


def stage_config(workspace, stages, out, kind: str, **over):
    data = {"sft": "sft_data", "dpo": "dpo_data"}[kind]
    settings = dict(model=None, stage={"type": kind, "init_from": str(stages / "pt_model")},
                    data__path=str(stages / data), data__eval_path=None, max_steps=4, save_interval=2,
                    schedule__total_steps=4, micro_batch_size=2, grad_accum_steps=1)
    settings.update(over)
    return tiny_train_config(workspace, out, **settings)


def resume_matches(workspace, stages, tmp_path, kind, ds_config, stop: bool, **over):
    """The run through the `deepspeed` launcher, and again stopped at step 2 (or, stop=False, continued from a copy
    of the first run's checkpoint of step 2) and resumed: the same losses."""
    full = stage_config(workspace, stages, tmp_path / "full", kind, **over)
    launch(full, ds_config=ds_config, launcher="deepspeed")
    split = stage_config(workspace, stages, tmp_path / "split", kind, **over)
    if stop:
        launch(split, ds_config=ds_config, sets=["max_steps=2"])
    else:
        copy_run(tmp_path / "full" / "run", tmp_path / "split", 2)
    proc = launch(split, ds_config=ds_config)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    expected, resumed = train_losses(tmp_path / "full" / "run"), train_losses(tmp_path / "split" / "run")
    assert sorted(expected) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step
    return proc, tmp_path / "full" / "run"


def test_sft_zero2_trains_and_resumes(workspace, stages, tmp_path):
    resume_matches(workspace, stages, tmp_path, "sft", "zero2.json", stop=True)


def test_dpo_zero3_live_reference_trains_and_resumes(workspace, stages, tmp_path):
    proc, run = resume_matches(workspace, stages, tmp_path, "dpo", "zero3.json", stop=False,
                               dpo={"reference": "live", "beta": 0.1})
    assert "reference model unchanged" in proc.stdout
    records = read_metrics(run)
    for tag in ("dpo/rewards_chosen", "dpo/rewards_rejected", "dpo/reward_accuracy", "dpo/reward_margin",
                "dpo/logps_chosen", "dpo/logps_rejected"):
        assert any(tag in r for r in records), tag
    # the policy starts as the reference: the first step's loss is log 2 and its rewards are 0
    first = next(r for r in records if r["step"] == 1)
    assert first["train/loss"] == pytest.approx(0.693147, abs=1e-4)


def test_dpo_precomputed_reference_equals_live(workspace, stages, tmp_path):
    losses = {}
    for reference in ("live", "precomputed", "precomputed"):
        out = tmp_path / f"{reference}{len(losses)}"
        cfg = stage_config(workspace, stages, out, "dpo", save_interval=4, dpo={"reference": reference})
        proc = launch(cfg, ds_config="zero2.json")
        losses[out.name] = train_losses(out / "run")
        if reference == "precomputed":
            assert ("reusing" in proc.stdout) == (len(losses) == 3), proc.stdout
    live, first, second = losses.values()
    for step in range(1, 5):
        assert first[step] == pytest.approx(live[step], rel=1e-5), step
        assert second[step] == first[step]
    assert list((stages / "dpo_data").glob("ref_logps_*.npy"))


def python_train(config):
    return run_python("train.py", ["--config", str(config)], check=False)


def test_sft_config_on_pt_shards_is_an_error(workspace, stages, tmp_path, capsys):
    cfg = stage_config(workspace, stages, tmp_path, "sft", data__path=str(workspace / "data" / "pt"))
    expect_user_error(train_in_process(capsys, "--config", str(cfg)), "was prepared for stage 'pt'",
                      "astrai-ds prepare --stage sft")


def test_pt_config_on_sft_shards_is_an_error(workspace, stages, tmp_path, capsys):
    cfg = tiny_train_config(workspace, tmp_path, data__path=str(stages / "sft_data"), data__eval_path=None)
    expect_user_error(train_in_process(capsys, "--config", str(cfg)), "was prepared for stage 'sft'",
                      "astrai-ds prepare --stage pt")


def test_reference_with_other_shape_or_vocabulary_is_an_error(workspace, stages, tmp_path):
    from astrai_ds.data.tokenizer import train_tokenizer

    other_shape = tmp_path / "other_shape"
    shutil.copytree(stages / "pt_model", other_shape)
    config = json.loads((other_shape / "config.json").read_text())
    (other_shape / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    cfg = stage_config(workspace, stages, tmp_path / "a", "dpo", dpo={"reference_model": str(other_shape)})
    expect_user_error(python_train(cfg), "dpo.reference_model", "n_layers 3 vs the policy's 2")

    other_vocab = tmp_path / "other_vocab"
    shutil.copytree(stages / "pt_model", other_vocab)
    train_tokenizer([workspace / "corpus" / "pretrain.jsonl"], 400, tmp_path / "tok")
    shutil.copyfile(tmp_path / "tok" / "tokenizer.json", other_vocab / "tokenizer.json")
    cfg = stage_config(workspace, stages, tmp_path / "b", "dpo", dpo={"reference_model": str(other_vocab)})
    expect_user_error(python_train(cfg), "another tokenizer")


def test_simpo_gamma_is_set_from_the_config_and_old_keys_say_where_they_went(workspace, stages, tmp_path, capsys):
    """dpo.gamma reaches SimPO's loss (it was stuck at 0.5); a config with DPO keys under `stage` is told where
    they moved."""
    losses = {}
    for gamma in (0.5, 3.0):
        out = tmp_path / f"g{gamma}"
        cfg = stage_config(workspace, stages, out, "dpo", max_steps=1, save_interval=1,
                           dpo={"loss_type": "simpo", "beta": 2.0, "gamma": gamma})
        run_python("train.py", ["--config", str(cfg)])
        losses[gamma] = train_losses(out / "run")[1]
    # At the first step policy = the SFT start for both; a larger target margin gives a larger loss.
    assert losses[3.0] > losses[0.5] + 0.5, losses
    cfg = stage_config(workspace, stages, tmp_path / "old", "dpo")
    expect_user_error(train_in_process(capsys, "--config", str(cfg), "--set", "stage.beta=0.2"),
                      "'stage.beta' has moved to 'dpo.beta'")


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_sft_with_lora_trains_the_adapters_alone_resumes_and_exports_merged(workspace, stages, tmp_path, ds_config):
    """LoRA SFT on 2 ranks: the run resumes exactly; its checkpoints hold the adapters alone (the frozen base is the
    folder the run started from); the export folds them into the base weights, which they changed only in the
    layers they target."""
    import torch

    from astrai_ds.config.model import ModelConfig
    from astrai_ds.convert.export import consolidated_state_dict, export_run
    from astrai_ds.model.io import folder_state

    lora = {"r": 4, "alpha": 8, "target": ["wq", "wv", "w2"]}
    proc, run = resume_matches(workspace, stages, tmp_path, "sft", ds_config, stop=True, lora=lora)
    assert "LoRA r 4 on wq, wv, w2" in proc.stdout
    state = consolidated_state_dict(run, "global_step4")
    assert state and all(".lora_A" in k or ".lora_B" in k for k in state), sorted(state)[:5]
    # the module states file too: no frozen weight, not the tied head's alias of the embedding
    for path in (run / "global_step4").glob("*model_states.pt"):
        module = torch.load(path, weights_only=False)["module"] or {}
        assert all(".lora_" in k for k in module), (path.name, sorted(k for k in module if ".lora_" not in k))
    assert any(v.abs().max() > 0 for k, v in state.items() if k.endswith(".lora_B"))  # B left zero: trained
    out = export_run(run, tmp_path / "merged")
    cfg = ModelConfig.load(run / "model_config.json")
    base, merged = folder_state(cfg, stages / "pt_model"), folder_state(cfg, out)  # our parameter names
    assert set(merged) == set(base)
    for name in base:
        changed = not torch.equal(base[name].float(), merged[name].float())
        assert changed == any(f".{t}." in name for t in lora["target"]), name
    if ds_config == "zero3.json":  # the adapter alone, in PEFT's layout: peft puts it on the base model
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from astrai_ds.convert.export import export_adapter
        from astrai_ds.errors import UserError

        adapter = export_adapter(run, tmp_path / "adapter")
        assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        ids = torch.randint(16, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        hf_base = AutoModelForCausalLM.from_pretrained(stages / "pt_model", torch_dtype=torch.float32)
        with_adapter = PeftModel.from_pretrained(hf_base, adapter).eval()
        hf_merged = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(with_adapter(ids).logits, hf_merged(ids).logits, rtol=1e-4, atol=1e-4)
        with pytest.raises(UserError, match="was not trained with LoRA"):
            export_adapter(stages / "pt" / "run", tmp_path / "none")
        assert not (tmp_path / "none").exists()


def test_sft_with_lora_on_one_rank_without_zero_resumes_and_exports(workspace, stages, tmp_path):
    """LoRA on one rank with ZeRO-0 (DeepSpeed's plain engine): stopped at step 2 and resumed, the same losses as the
    run straight through; the checkpoint's module holds the adapters alone, and the export changes the targeted
    weights (by default every projection) and nothing else."""
    import torch

    from astrai_ds.config.model import ModelConfig
    from astrai_ds.convert.export import consolidated_state_dict, export_run
    from astrai_ds.model.io import folder_state

    losses = {}
    for name, stops in (("full", []), ("split", [["max_steps=2"]])):
        config = stage_config(workspace, stages, tmp_path / name, "sft", lora={"r": 4, "alpha": 8})
        for sets in stops:
            launch(config, ds_config="zero0.json", nproc=1, sets=sets)
        proc = launch(config, ds_config="zero0.json", nproc=1)
        assert ("resumed from" in proc.stdout) == bool(stops)
        losses[name] = train_losses(tmp_path / name / "run")
    assert sorted(losses["full"]) == [1, 2, 3, 4]
    for step, loss in losses["full"].items():
        assert losses["split"][step] == pytest.approx(loss, rel=1e-6), step
    run = tmp_path / "full" / "run"
    # the adapters alone: not the tied head's alias of the frozen embedding either
    state = consolidated_state_dict(run, "global_step4")
    assert state and all(".lora_" in k for k in state), sorted(k for k in state if ".lora_" not in k)
    cfg = ModelConfig.load(run / "model_config.json")
    base, merged = folder_state(cfg, stages / "pt_model"), folder_state(cfg, export_run(run, tmp_path / "merged"))
    for name in base:
        changed = not torch.equal(base[name].float(), merged[name].float())
        targeted = name.startswith("layers.") and name.endswith(tuple(f"{t}.weight" for t in ("wq", "wk", "wv", "wo",
                                                                                                "w1", "w2", "w3")))
        assert changed == targeted, name


def test_dpo_with_lora_needs_no_second_model(workspace, stages, tmp_path):
    """DPO under LoRA: the reference is the policy with its adapters off, which gives the losses a live reference
    engine built from the base folder gives (fp32, 2 ranks, ZeRO-3), and the base weights stay frozen."""
    losses = {}
    for name, dpo in (("adapters_off", {"reference": "live"}),
                      ("engine", {"reference": "live", "reference_model": str(stages / "pt_model")})):
        config = stage_config(workspace, stages, tmp_path / name, "dpo", lora={"r": 4, "alpha": 8}, dpo=dpo)
        proc = launch(config, ds_config="zero3.json")
        assert "reference model unchanged" in proc.stdout
        losses[name] = train_losses(tmp_path / name / "run")
    assert sorted(losses["engine"]) == [1, 2, 3, 4]
    assert losses["adapters_off"][1] == pytest.approx(0.693147, abs=1e-4)  # the policy starts as the reference
    for step, loss in losses["engine"].items():
        assert losses["adapters_off"][step] == pytest.approx(loss, abs=1e-6), step


def test_lora_on_pipeline_stages_or_with_a_target_that_matches_nothing_is_one_line(workspace, stages, tmp_path):
    config = stage_config(workspace, stages, tmp_path / "pipe", "sft", lora={"r": 4}, parallel={"pipeline_stages": 2})
    expect_user_error(run_python("train.py", ["--config", str(config)], check=False), "lora.r",
                      "LoRA does not run on pipeline")
    config = stage_config(workspace, stages, tmp_path / "target", "sft", lora={"r": 4, "target": ["q_proj"]})
    expect_user_error(run_python("train.py", ["--config", str(config)], check=False), "lora.target",
                      "matches none of the model's linear layers", "wq")
