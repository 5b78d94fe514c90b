import math

import pytest

from astrai_ds.config.train import ScheduleConfig
from astrai_ds.training.schedules import lr_multiplier


def test_warmup_is_linear_and_never_zero():
    cfg = ScheduleConfig(type="cosine", warmup_steps=10)
    assert lr_multiplier(0, cfg, 100) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg, 100) == pytest.approx(1.0)


def test_cosine_reaches_min_ratio():
    cfg = ScheduleConfig(type="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(10, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.55)
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(500, cfg, 110) == pytest.approx(0.1)  # past the end stays at the floor


def test_wsd_is_flat_then_decays():
    cfg = ScheduleConfig(type="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_multiplier(79, cfg, 100) == 1.0
    assert lr_multiplier(90, cfg, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, cfg, 100) == pytest.approx(0.0)


def test_constant_and_linear():
    assert lr_multiplier(50, ScheduleConfig(type="constant", warmup_steps=0), 100) == 1.0
    cfg = ScheduleConfig(type="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_multiplier(25, cfg, 100) == pytest.approx(0.75)
    assert all(math.isfinite(lr_multiplier(s, cfg, 100)) for s in range(200))
