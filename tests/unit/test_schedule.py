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


def test_a_resume_names_the_jump_a_changed_schedule_makes():
    """A resume follows this launch's schedule from its next step; where the settings changed since the checkpoint give
    that step another lr, schedule_jump says so with both values (the trainer logs it as a warning). Values by hand.
    (Before, a finished cosine run extended from 100 to 200 steps went from min_lr 0.1 back up to 0.89 at once, and
    the log said only 'train.steps 100 -> 200'.)"""
    from dataclasses import asdict

    from train.optim import schedule_jump

    saved = asdict(cfg(lr_schedule="cosine"))
    after = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 90 / 190))   # step index 100 of 200, warm-up 10
    assert schedule_jump(saved, cfg(lr_schedule="cosine", steps=200), 100) == (
        f"the learning rate of step 101 is {after:.4g} under this launch's schedule, where the checkpoint's gave 0.1 "
        f"(train.steps 100 -> 200): it rises at once, without warm-up, and follows the new schedule from there")
    cosine, linear = (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 40 / 90)), 0.1 + 0.9 * 50 / 90)   # step 50 of 100
    assert (f"is {linear:.4g} under this launch's schedule, where the checkpoint's gave {cosine:.4g} "
            "(train.lr_schedule 'cosine' -> 'linear'): it drops") in schedule_jump(saved, cfg(lr_schedule="linear"), 50)
    wsd = asdict(cfg(lr_schedule="wsd"))   # extended in its stable phase (decay from step 80, now from 160): no jump
    assert schedule_jump(wsd, cfg(lr_schedule="wsd", steps=200), 50) == ""
    assert "gave 0.55 (train.steps 100 -> 200)" in schedule_jump(wsd, cfg(lr_schedule="wsd", steps=200), 90)
    assert schedule_jump(saved, cfg(lr_schedule="cosine", warmup_steps=5), 30) != ""
    constant = asdict(cfg(lr_schedule="constant"))   # another warm-up, once past it: the same lr
    assert schedule_jump(constant, cfg(lr_schedule="constant", warmup_steps=5), 30) == ""
    assert schedule_jump(saved, cfg(lr_schedule="cosine"), 30) == ""
