import json
from pathlib import Path

import pytest

from astrai_ds.config.base import from_dict
from astrai_ds.config.deepspeed import (DS_CONFIG_DIR, check_batch_size, check_nvme_offload, find_ds_config,
                                        load_ds_config, nvme_paths, resolve_ds_config)
from astrai_ds.config.train import TrainConfig
from astrai_ds.errors import ConfigError

TRAIN = {"model": "m", "tokenizer": "t", "data": {"path": "d", "seq_len": 64}, "output_dir": "o",
         "micro_batch_size": 4, "grad_accum_steps": 2}


def _train():
    return from_dict(TrainConfig, TRAIN)


def test_ds_auto_values_filled():
    ds, path = load_ds_config("zero3.json")
    assert path.parent.name == "ds_configs"
    out = resolve_ds_config(ds, _train(), world_size=2, bf16_supported=True)
    assert out["train_micro_batch_size_per_gpu"] == 4 and out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 16 and out["gradient_clipping"] == 1.0
    assert out["bf16"]["enabled"] is True and out["fp16"]["enabled"] is False
    assert resolve_ds_config(ds, _train(), 2, bf16_supported=False)["bf16"]["enabled"] is False


def test_ds_accelerator_only_settings_follow_the_device():
    ds, _ = load_ds_config("zero2.json")
    assert ds["zero_optimization"]["overlap_comm"] == "auto"
    gpu = resolve_ds_config(ds, _train(), 2, bf16_supported=True, accelerator=True)["zero_optimization"]
    cpu = resolve_ds_config(ds, _train(), 2, bf16_supported=True, accelerator=False)["zero_optimization"]
    assert gpu["overlap_comm"] is True and gpu["contiguous_gradients"] is True
    assert cpu["overlap_comm"] is False and cpu["contiguous_gradients"] is False
    explicit = {"zero_optimization": {"stage": 2, "overlap_comm": True}}
    assert resolve_ds_config(explicit, _train(), 1, bf16_supported=True,
                             accelerator=False)["zero_optimization"]["overlap_comm"] is True


def test_ds_nvme_path_auto_is_in_the_run_folder(tmp_path):
    ds, _ = load_ds_config("zero3_nvme.json")
    assert ds["zero_optimization"]["offload_optimizer"] == {**ds["zero_optimization"]["offload_optimizer"],
                                                            "device": "nvme", "nvme_path": "auto"}
    out = resolve_ds_config(ds, _train(), 2, bf16_supported=False, accelerator=False)
    assert out["zero_optimization"]["offload_optimizer"]["nvme_path"] == str(Path("o") / "nvme_offload")
    assert nvme_paths(out) == [Path("o") / "nvme_offload"]
    assert nvme_paths(resolve_ds_config(load_ds_config("zero3_offload.json")[0], _train(), 2,
                                        bf16_supported=False)) == []
    own = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}}
    assert nvme_paths(resolve_ds_config(own, _train(), 1, bf16_supported=False)) == [tmp_path]
    missing = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}
    with pytest.raises(ConfigError, match=r"zero_optimization.offload_optimizer.device \"nvme\" needs nvme_path"):
        resolve_ds_config(missing, _train(), 1, bf16_supported=False, source="mine.json")


def test_nvme_offload_without_libaio_says_what_to_install(monkeypatch):
    """DeepSpeed would fail deep inside the engine's set-up; the check names the package first."""
    from deepspeed.accelerator import get_accelerator

    out = resolve_ds_config(load_ds_config("zero3_nvme.json")[0], _train(), 2, bf16_supported=False)
    builder = type(get_accelerator().create_op_builder("AsyncIOBuilder"))
    monkeypatch.setattr(builder, "is_compatible", lambda self, verbose=False: False)
    monkeypatch.setattr("deepspeed.git_version_info.installed_ops", {"async_io": False})
    with pytest.raises(ConfigError, match=r"^zero3_nvme.json: offloading to \"nvme\" needs .*install libaio-dev"):
        check_nvme_offload(out, "zero3_nvme.json")
    check_nvme_offload(resolve_ds_config(load_ds_config("zero3.json")[0], _train(), 2, bf16_supported=False), "x")


def test_ds_pure_bf16_needs_bf16_and_zero():
    ds, _ = load_ds_config("zero2_pure_bf16.json")
    assert resolve_ds_config(ds, _train(), 2, bf16_supported=True)["bf16"]["bf16_optimizer_states"] is True
    with pytest.raises(ConfigError, match="bf16.bf16_master_weights_and_grads keeps weights in bf16"):
        resolve_ds_config(ds, _train(), 2, bf16_supported=False)
    ds["zero_optimization"]["stage"] = 0
    with pytest.raises(ConfigError, match="needs ZeRO stage 1, 2 or 3"):
        resolve_ds_config(ds, _train(), 2, bf16_supported=True)


def test_ds_batch_mismatch_names_all_four_numbers():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 10}
    with pytest.raises(ConfigError) as e:
        resolve_ds_config(ds, _train(), world_size=2, bf16_supported=True, source="my_ds.json")
    msg = str(e.value)
    assert "my_ds.json" in msg and "(10)" in msg and "(4)" in msg and "(2)" in msg and "= 16" in msg


def test_ds_leftover_auto_is_an_error():
    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size"):
        resolve_ds_config(ds, _train(), 1, bf16_supported=True)


def test_ds_explicit_values_win_and_scheduler_rejected():
    out = resolve_ds_config({"train_micro_batch_size_per_gpu": 2}, _train(), 1, bf16_supported=True)
    assert out["train_micro_batch_size_per_gpu"] == 2 and out["train_batch_size"] == 4
    with pytest.raises(ConfigError, match="remove the 'scheduler' section"):
        resolve_ds_config({"scheduler": {"type": "WarmupLR"}}, _train(), 1, bf16_supported=True)


def test_ds_config_lookup(tmp_path, monkeypatch):
    assert find_ds_config("zero2.json").name == "zero2.json"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zero2.json").write_text("{}")
    assert find_ds_config("zero2.json").resolve() == (tmp_path / "zero2.json").resolve()
    with pytest.raises(ConfigError, match="DeepSpeed config not found: nope.json"):
        find_ds_config("nope.json")


def load_error(tmp_path, ds: dict) -> str:
    """The message `load_ds_config` gives for `ds` written to a file: one line that starts with the file."""
    path = tmp_path / "my_ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        load_ds_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


def test_shipped_ds_configs_pass_the_check_and_resolve():
    for path in sorted(DS_CONFIG_DIR.glob("*.json")):
        ds, _ = load_ds_config(path)
        for world_size in (1, 2):
            resolve_ds_config(ds, _train(), world_size, bf16_supported=True, accelerator=False, source=str(path))


def test_ds_misspelled_section_is_an_error(tmp_path):
    message = load_error(tmp_path, {"zero_optimisation": {"stage": 2}})  # plain DeepSpeed trains with ZeRO-0
    assert "unknown key 'zero_optimisation' (did you mean 'zero_optimization'?)" in message
    assert "correct or remove it" in message


def test_ds_unknown_top_level_key_is_an_error(tmp_path):
    assert "unknown key 'stepz_per_print' (did you mean 'steps_per_print'?)" in load_error(
        tmp_path, {"stepz_per_print": 10})
    assert "unknown key 'my_notes'" in load_error(tmp_path, {"my_notes": "fast run"})


def test_ds_unknown_key_inside_a_section_is_one_line(tmp_path):
    message = load_error(tmp_path, {"zero_optimization": {"stage": 2, "overlap_comms": True}})
    assert "unknown key 'zero_optimization.overlap_comms' (did you mean 'zero_optimization.overlap_comm'?)" in message
    message = load_error(tmp_path, {"zero_optimization": {"stage": 3, "offload_param": {"devise": "cpu"}}})
    assert ("'zero_optimization.offload_param.devise' (did you mean 'zero_optimization.offload_param.device'?)"
            in message)
    assert "unknown key 'bf16.master_weights'" in load_error(tmp_path, {"bf16": {"master_weights": True}})
    message = load_error(tmp_path, {"wandb": {"projct": "x"}})
    assert "unknown key 'wandb.projct' (did you mean 'wandb.project'?)" in message


def test_ds_wrong_types_name_the_dotted_key(tmp_path):
    message = load_error(tmp_path, {"zero_optimization": {"stage": "two"}})
    assert "key 'zero_optimization.stage' must be 0, 1, 2, 3" in message
    message = load_error(tmp_path, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}})
    assert "key 'zero_optimization.offload_optimizer.device' must be 'none', 'cpu' or 'nvme', got \"gpu\"" in message
    assert "key 'bf16' must be a JSON object (a section), got true" in load_error(tmp_path, {"bf16": True})
    message = load_error(tmp_path, {"prescale_gradients": "yes"})
    assert "key 'prescale_gradients' must be true or false, got \"yes\"" in message
    assert "key 'gradient_clipping' must be a number" in load_error(tmp_path, {"gradient_clipping": "1.0"})


def test_ds_check_runs_deepspeeds_own_checks(tmp_path):
    assert "Apex AMP integration has been removed" in load_error(tmp_path, {"amp": {"enabled": True}})
    assert "not supported with ZeRO stage 3" in load_error(
        tmp_path, {"zero_optimization": {"stage": 3}, "gradient_allreduce_op": "sum"})


def test_ds_check_at_load_refuses_what_resolve_would(tmp_path):
    assert "cannot resolve \"auto\" for zero_optimization.reduce_bucket_size" in load_error(
        tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}})
    assert "remove the 'optimizer' section" in load_error(tmp_path, {"optimizer": {"type": "AdamW", "params": {}}})


def test_ds_explicit_batch_sizes_are_checked_against_the_world_size_later(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                                "train_batch_size": 16}))
    ds, _ = load_ds_config(path)  # 4 x 2 x 2 ranks: not known to be wrong before the world size is
    assert resolve_ds_config(ds, _train(), 2, bf16_supported=True)["train_batch_size"] == 16
    with pytest.raises(ConfigError, match=r"data-parallel size \(1\) = 8"):
        resolve_ds_config(ds, _train(), 1, bf16_supported=True)


def test_ds_config_in_yaml_is_refused(tmp_path):
    path = tmp_path / "ds.yaml"
    path.write_text("zero_optimization:\n  stage: 2\n")
    with pytest.raises(ConfigError, match="a DeepSpeed config is JSON"):
        load_ds_config(path)


def test_ds_batch_check_shows_all_four_numbers():
    check_batch_size({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": 24},
                     3, "ds.json")
    with pytest.raises(ConfigError, match=r"train_batch_size \(24\) must equal .* \(4\) x .* \(2\) x data-parallel "
                                          r"size \(2\) = 16"):
        check_batch_size({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                          "train_batch_size": 24}, 2, "ds.json")


def _pipeline_train(**parallel):
    return from_dict(TrainConfig, {**TRAIN, "parallel": {"pipeline_stages": 2, **parallel}})


def test_ds_pipeline_batch_counts_replicas_and_refuses_zero2_and_3():
    ds, _ = load_ds_config("pipeline.json")
    out = resolve_ds_config(ds, _pipeline_train(), world_size=4, bf16_supported=False)
    assert out["train_batch_size"] == 4 * 2 * 2  # 2 stages x 2 replicas: data-parallel size 2
    assert out["zero_optimization"]["stage"] == 1
    for name in ("zero2.json", "zero3.json"):
        with pytest.raises(ConfigError, match=r"ZeRO stage [23] does not combine with pipeline stages.*pipeline.json"):
            resolve_ds_config(load_ds_config(name)[0], _pipeline_train(), 2, bf16_supported=False)
    with pytest.raises(ConfigError, match="pipeline_stages 2 does not divide the 3 ranks"):
        resolve_ds_config(ds, _pipeline_train(), 3, bf16_supported=False)


def test_pipeline_config_checks():
    assert _pipeline_train(partition_method="type:BlockPipe").parallel.partition_method == "type:BlockPipe"
    with pytest.raises(ConfigError, match="'parallel.partition_method' must be .*got 'balanced'"):
        _pipeline_train(partition_method="balanced")
    with pytest.raises(ConfigError, match="'parallel.pipeline_stages' must be >= 1"):
        _pipeline_train(pipeline_stages=0)
    dpo = {**TRAIN, "stage": {"type": "dpo", "init_from": "sft_model"}, "parallel": {"pipeline_stages": 2}}
    with pytest.raises(ConfigError, match="'parallel.pipeline_stages' is 2, but DPO does not run on pipeline stages"):
        from_dict(TrainConfig, dpo)


def _muon(**over):
    return from_dict(TrainConfig, {**TRAIN, "optimizer": {"type": "muon", "grad_clip": 0.0}, **over})


def test_muon_fits_zero3_and_refuses_what_deepspeed_gets_wrong():
    """Muon under ZeRO-3 reduces without reduce-scatter (set where the config says nothing); DeepSpeed 0.19's known
    faults with Muon (it clips the orthogonalised update, not the gradient; under ZeRO-3 it runs Muon per
    micro-batch) and an offloaded optimizer are refused in one line each."""
    zero3 = load_ds_config("zero3.json")[0]
    one_step = _muon(grad_accum_steps=1)
    assert resolve_ds_config(zero3, one_step, 2, bf16_supported=False)["zero_optimization"]["reduce_scatter"] is False
    assert resolve_ds_config(load_ds_config("zero2.json")[0], _muon(), 2,
                             bf16_supported=False)["zero_optimization"]["reduce_scatter"] is True
    explicit = {"zero_optimization": {"stage": 3, "reduce_scatter": True}}
    with pytest.raises(ConfigError, match="reduce_scatter true does not combine with optimizer.type muon"):
        resolve_ds_config(explicit, one_step, 2, bf16_supported=False, source="mine.json")
    with pytest.raises(ConfigError, match="grad_accum_steps 2: DeepSpeed .* each micro-batch"):
        resolve_ds_config(zero3, _muon(), 2, bf16_supported=False)
    clipped = from_dict(TrainConfig, {**TRAIN, "optimizer": {"type": "muon"}})
    with pytest.raises(ConfigError, match="train.json: optimizer.grad_clip is 1, but with optimizer.type muon .* set "
                                          "optimizer.grad_clip to 0"):
        resolve_ds_config(load_ds_config("zero2.json")[0], clipped, 2, bf16_supported=False, train_source="train.json")
    with pytest.raises(ConfigError, match="offload_optimizer does not combine with optimizer.type muon"):
        resolve_ds_config(load_ds_config("zero3_offload.json")[0], one_step, 2, bf16_supported=False)
    adamw = resolve_ds_config(zero3, _train(), 2, bf16_supported=False)["zero_optimization"]
    assert "reduce_scatter" not in adamw  # other optimizers: the config as written


def test_muon_refuses_lora_and_pipeline_stages():
    from astrai_ds.config.base import FieldError

    with pytest.raises((ConfigError, FieldError), match="optimizer.type.*LoRA's adapters"):
        _muon(lora={"r": 4})
    with pytest.raises((ConfigError, FieldError), match="optimizer.type.*pipeline stages"):
        _muon(parallel={"pipeline_stages": 2})
