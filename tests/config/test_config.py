import json
from pathlib import Path

import pytest
import yaml

from astrai_ds.config.base import apply_overrides, from_dict
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
    shipped = sorted(Path("configs/train").glob("*.json"))
    assert {p.stem for p in shipped} >= {"pt_tiny", "sft_tiny", "dpo_tiny", "grpo_tiny", "pt_1b", "grpo_smollm2"}
    for path in shipped:
        TrainConfig.load(path)


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
    with pytest.raises(ConfigError, match="'dim' \\(250\\) must be divisible by n_heads \\(4\\), or set head_dim"):
        from_dict(ModelConfig, {"dim": 250, "n_heads": 4}, "m.json")
    # a head_dim of its own (Qwen3's) lifts the divisibility rule, and must be even
    assert from_dict(ModelConfig, {"dim": 250, "n_heads": 4, "head_dim": 32}, "m.json").head_size == 32
    assert from_dict(ModelConfig, {"dim": 256, "n_heads": 4}, "m.json").head_size == 64
    with pytest.raises(ConfigError, match="'head_dim' must be positive and even for RoPE, got 33"):
        from_dict(ModelConfig, {"head_dim": 33}, "m.json")
    with pytest.raises(ConfigError, match="'attention_bias' and qk_norm together"):
        from_dict(ModelConfig, {"qk_norm": True, "attention_bias": True}, "m.json")
    with pytest.raises(ConfigError, match="m.json.*'rope_scaling.low_freq_factor'"):
        from_dict(ModelConfig, {"rope_scaling": {"low_freq_factor": 5.0}}, "m.json")
    with pytest.raises(ConfigError, match="'rope_scaling.rope_type'"):
        from_dict(ModelConfig, {"rope_scaling": {"rope_type": "yarn"}}, "m.json")


TINY_YAML = """\
# the same run as TINY_JSON below, in YAML
model: configs/model/tiny.json
tokenizer: tok
data:
  path: d
  seq_len: 64
output_dir: out
micro_batch_size: 4
grad_accum_steps: 2
optimizer:
  lr: 3e-3          # YAML 1.1 alone would read this as a string
  betas: [0.9, 0.95]
schedule: {type: wsd, warmup_steps: 5}
"""
TINY_JSON = {**BASE, "optimizer": {"lr": 3e-3, "betas": [0.9, 0.95]}, "schedule": {"type": "wsd", "warmup_steps": 5}}


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_train_config_loads_like_its_json_twin(tmp_path, suffix):
    yaml_path = tmp_path / f"train{suffix}"
    yaml_path.write_text(TINY_YAML)
    json_path = write(tmp_path, TINY_JSON)
    assert TrainConfig.load(yaml_path) == TrainConfig.load(json_path)
    assert TrainConfig.load(yaml_path).optimizer.lr == 0.003
    overrides = ["max_steps=7", "data.seq_len=32", "optimizer.betas=[0.8,0.9]"]
    from_yaml = TrainConfig.load(yaml_path, overrides)
    assert from_yaml == TrainConfig.load(json_path, overrides) and from_yaml.data.seq_len == 32


def test_yaml_model_config_loads_like_its_json_twin(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(json.loads(Path("configs/model/tiny.json").read_text())))
    assert ModelConfig.load(path) == ModelConfig.load("configs/model/tiny.json")


def test_yaml_gets_the_same_validation(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(TINY_YAML)
    with pytest.raises(ConfigError, match=r"train.yaml \(with --set overrides\): key 'max_steps' must be an integer"):
        TrainConfig.load(path, ["max_steps=ten"])
    path.write_text(TINY_YAML.replace("  seq_len: 64", "  seqlen: 64"))
    with pytest.raises(ConfigError, match=r"train.yaml: unknown key 'data.seqlen' \(did you mean 'data.seq_len'\?\)"):
        TrainConfig.load(path)


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\ndata:\n  path: d\n seq_len: 64\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line 4, column 2: "):
        TrainConfig.load(path)
    path.write_text("model: x\n1: y\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line 2, column 1: key '1' is read as int"):
        TrainConfig.load(path)


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yml"
    path.write_text("- model: x\n- tokenizer: t\n")
    with pytest.raises(ConfigError, match=r"list.yml: expected a mapping \(key: value lines\) at the top level, "
                                          r"got list"):
        TrainConfig.load(path)
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="list.yml: expected a mapping .* got an empty document"):
        ModelConfig.load(path)


def test_yaml_dates_stay_strings(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(TINY_YAML.replace("output_dir: out", "output_dir: 2024-01-01"))
    assert TrainConfig.load(path).output_dir == "2024-01-01"
