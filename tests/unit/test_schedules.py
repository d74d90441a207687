import math

import pytest

from trainers.config import OptimConfig
from trainers.schedules import lr_at


def test_warmup_is_linear_and_never_zero():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="constant")
    assert [lr_at(s, 100, cfg) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_cosine_reaches_floor_at_last_step_and_is_monotone():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[9] == 1.0 and lrs[10] == 1.0
    assert math.isclose(lrs[-1], 0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert math.isclose(lr_at(55, 100, cfg), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_wsd_is_flat_then_decays_linearly_over_the_decay_fraction():
    cfg = OptimConfig(lr=2.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert all(lr == 2.0 for lr in lrs[5:80])
    assert lrs[80] == 2.0 and lrs[99] == pytest.approx(0.0)
    assert lrs[90] == pytest.approx(2.0 * (1 - 10 / 19))
