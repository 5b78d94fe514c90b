import json

import pytest

from astrai_ds.config.base import apply_overrides, from_dict
from astrai_ds.config.deepspeed import find_ds_config, load_ds_config, resolve_ds_config
from astrai_ds.config.model import ModelConfig
from astrai_ds.config.train import TrainConfig
from astrai_ds.errors import ConfigError

BASE = {"model": "configs/model/tiny.json", "tokenizer": "tok", "data": {"path": "d", "seq_len": 64},
        "output_dir": "out", "micro_batch_size": 4, "grad_accum_steps": 2}


def write(tmp_path, data, name="train.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_shipped_configs_load():
    for name in ("tiny", "small", "1b"):
        ModelConfig.load(f"configs/model/{name}.json")
    one_b = ModelConfig.load("configs/model/1b.json")
    assert (one_b.dim, one_b.n_layers, one_b.n_heads, one_b.n_kv_heads, one_b.ffn_dim) == (1536, 24, 24, 4, 6912)
    for name in ("pt_tiny", "pt_small", "pt_1b"):
        TrainConfig.load(f"configs/train/{name}.json")


def test_vocab_auto_rounds_up_to_64():
    assert ModelConfig(vocab_size="auto").resolved(2000).vocab_size == 2048
    assert ModelConfig(vocab_size="auto").resolved(2048).vocab_size == 2048
    assert ModelConfig(vocab_size=5000).resolved(2000).vocab_size == 5000


def test_unknown_key_names_file_and_suggests(tmp_path):
    path = write(tmp_path, {**BASE, "data": {"path": "d", "seqlen": 64}})
    with pytest.raises(ConfigError, match=r"train.json: unknown key 'data.seqlen' \(did you mean 'data.seq_len'\?\)"):
        TrainConfig.load(path)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, {**BASE, "max_steps": "ten"})
    with pytest.raises(ConfigError, match=r"train.json: key 'max_steps' must be an integer, got \"ten\""):
        TrainConfig.load(path)


def test_missing_required_key(tmp_path):
    data = dict(BASE)
    del data["output_dir"]
    with pytest.raises(ConfigError, match="missing required key 'output_dir'"):
        TrainConfig.load(write(tmp_path, data))


def test_invalid_value_in_section_names_dotted_key(tmp_path):
    path = write(tmp_path, {**BASE, "schedule": {"min_lr_ratio": 2}})
    with pytest.raises(ConfigError, match=r"key 'schedule.min_lr_ratio' must be in \[0, 1\]"):
        TrainConfig.load(path)


def test_literal_rejects_unknown_choice(tmp_path):
    with pytest.raises(ConfigError, match="'schedule.type' must be one of"):
        TrainConfig.load(write(tmp_path, {**BASE, "schedule": {"type": "exp"}}))


def test_bad_json_names_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "model": "x",\n}')
    with pytest.raises(ConfigError, match=r"bad.json: invalid JSON at line 3"):
        TrainConfig.load(path)


def test_set_overrides_parse_json_and_strings(tmp_path):
    cfg = TrainConfig.load(write(tmp_path, BASE), ["max_steps=7", "data.seq_len=32", "optimizer.betas=[0.8,0.9]",
                                                    "resume=none", "schedule.type=wsd"])
    assert cfg.max_steps == 7 and cfg.data.seq_len == 32 and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.resume == "none" and cfg.schedule.type == "wsd"


def test_set_unknown_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'data.seq_lenn'"):
        TrainConfig.load(write(tmp_path, BASE), ["data.seq_lenn=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["max_steps"])


def test_model_shape_checks():
    with pytest.raises(ConfigError, match="'n_kv_heads' \\(3\\) must divide n_heads \\(4\\)"):
        from_dict(ModelConfig, {"n_heads": 4, "n_kv_heads": 3}, "m.json")


def _train():
    return TrainConfig(model="m", tokenizer="t", data=from_dict(TrainConfig, BASE).data, output_dir="o",
                       micro_batch_size=4, grad_accum_steps=2)


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
