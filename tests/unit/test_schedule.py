"""Learning-rate schedules against values computed by hand."""

import math

import pytest

from train.config import TrainConfig
from train.optim import lr_at


def cfg(**kw):
    base = dict(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    base.update(kw)
    return TrainConfig(**base)


def test_linear_warmup_reaches_peak_at_last_warmup_step():
    c = cfg(lr_schedule="cosine")
    assert [lr_at(s, c) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_midpoint_and_end():
    c = cfg(lr_schedule="cosine")
    assert lr_at(10, c) == pytest.approx(1.0)
    assert lr_at(55, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, c) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    c = cfg(lr_schedule="wsd", wsd_decay_fraction=0.2)
    assert lr_at(50, c) == pytest.approx(1.0) and lr_at(79, c) == pytest.approx(1.0)
    assert lr_at(90, c) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, c) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_at(55, cfg(lr_schedule="linear")) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(80, cfg(lr_schedule="constant")) == pytest.approx(1.0)
