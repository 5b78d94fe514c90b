"""LoRA adapters on the tiny model (CPU, fp32, well under a second each): the adapted model starts as the base
model, only the adapters train, switching them off gives the base model back, and the merged weights give the
adapted model's logits."""

import math

import pytest
import torch

from astrai_ds.config.base import FieldError
from astrai_ds.config.train import LoraConfig
from astrai_ds.errors import ConfigError
from astrai_ds.model import ModelConfig, Transformer
from astrai_ds.model.lora import LoraLinear, adapters_enabled, apply_lora, merged_state_dict

CFG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, max_seq_len=64)
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
TARGET = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def base_and_adapted(r: int = 4, alpha: float = 8.0, target=TARGET):
    torch.manual_seed(0)
    base = Transformer(CFG).eval()
    adapted = Transformer(CFG).eval()
    adapted.load_state_dict(base.state_dict())
    names = apply_lora(adapted, r, alpha, 0.0, target)
    return base, adapted, names


def test_the_adapted_model_starts_as_the_base_and_trains_the_adapters_alone():
    base, adapted, names = base_and_adapted()
    assert len(names) == 2 * 7 and all(isinstance(dict(adapted.named_modules())[n], LoraLinear) for n in names)
    torch.testing.assert_close(adapted(IDS), base(IDS), rtol=0, atol=0)  # B is zero: exactly the base model
    trained = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A" in n or ".lora_B" in n for n in trained) and len(trained) == 2 * len(names)
    # the base weights keep their names: a model folder's state loads into the adapted model
    assert set(base.state_dict()) <= set(adapted.state_dict())
    adapted.train()
    adapted(IDS).float().logsumexp(-1).mean().backward()
    assert all(p.grad is None for n, p in adapted.named_parameters() if ".lora_" not in n)
    assert all(p.grad is not None for n, p in adapted.named_parameters() if ".lora_B" in n)


def test_merged_weights_give_the_adapted_logits_and_switching_off_gives_the_base():
    base, adapted, _ = base_and_adapted(r=4, alpha=8.0)
    with torch.no_grad():
        for _, m in adapted.named_modules():
            if isinstance(m, LoraLinear):
                m.lora_B.normal_(0, 0.02)  # as after some training
    out = adapted(IDS)
    assert (out - base(IDS)).abs().max() > 1e-3
    with adapters_enabled(adapted, False):
        torch.testing.assert_close(adapted(IDS), base(IDS), rtol=0, atol=0)
    torch.testing.assert_close(adapted(IDS), out)  # back on after the block
    merged = Transformer(CFG).eval()
    merged.load_state_dict(merged_state_dict(adapted.state_dict(), 8.0 / 4), strict=True)
    torch.testing.assert_close(merged(IDS), out, rtol=1e-5, atol=1e-5)


def test_targets_by_name_or_pattern_and_a_target_that_matches_nothing():
    _, _, names = base_and_adapted(target=["re:layers\\.0\\.attention\\.w[qv]"])
    assert names == ["layers.0.attention.wq", "layers.0.attention.wv"]
    with pytest.raises(ConfigError, match=r"matches none of the model's linear layers; their names are .*wq"):
        base_and_adapted(target=["q_proj"])


def test_the_lora_section_is_checked():
    assert not LoraConfig().enabled and LoraConfig(r=8, alpha=16).scale == 2.0
    for bad, key in (({"r": -1}, "r"), ({"r": 4, "alpha": 0}, "alpha"), ({"r": 4, "dropout": 1.0}, "dropout"),
                     ({"r": 4, "target": []}, "target"), ({"r": 4, "target": ["re:("]}, "target")):
        with pytest.raises(FieldError) as e:
            LoraConfig(**bad)
        assert e.value.key == key
    assert math.isclose(LoraConfig(r=2, alpha=3).scale, 1.5)
