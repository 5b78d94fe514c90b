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


def _formula(kind: str, step: int, warmup: int, total: int, floor: float, decay: float) -> float:
    """Each schedule written out independently of the implementation (post-warm-up part)."""
    p = min(1.0, (step - warmup) / (total - warmup))
    value = {"constant": 1.0,
             "cosine": floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)),
             "linear": 1 - (1 - floor) * p,
             "wsd": 1.0 if p <= 1 - decay else 1 - (1 - floor) * (p - (1 - decay)) / decay}[kind]
    return max(floor, value)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd"])
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_every_schedule_matches_its_formula_first_middle_last_and_past_the_end(kind, floor):
    warmup, total, decay = 10, 110, 0.3
    cfg = ScheduleConfig(type=kind, warmup_steps=warmup, min_lr_ratio=floor, decay_fraction=decay)
    assert lr_multiplier(0, cfg, total) == pytest.approx(1 / warmup)  # first: warm-up, never 0
    for step in (warmup, 60, 95, total - 1, total, total + 1, 10 * total):  # after warm-up, middle, last, past
        assert lr_multiplier(step, cfg, total) == pytest.approx(_formula(kind, step, warmup, total, floor, decay),
                                                                abs=1e-12), step


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
@pytest.mark.parametrize("decay", [0.1, 0.2, 0.3, 0.7, 0.9])
def test_no_schedule_goes_below_its_floor(kind, decay):
    """schedule.total_steps below max_steps: no step goes below the floor, and the steps past the schedule's end
    stay at it (with min_lr_ratio 0, wsd's formula alone gave -2.2e-16 at decay_fraction 0.3)."""
    for floor in (0.0, 0.05):
        cfg = ScheduleConfig(type=kind, warmup_steps=10, min_lr_ratio=floor, decay_fraction=decay, total_steps=100)
        values = [lr_multiplier(step, cfg, cfg.total_steps) for step in range(300)]
        assert min(values) >= floor and values[-1] == pytest.approx(floor, abs=1e-12)
