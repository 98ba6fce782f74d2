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


def test_a_resume_names_the_jump_of_the_vision_towers_own_learning_rates():
    """train.vision_lr / train.projector_lr changed at a resume move those parts' lr from their next step, as a changed
    train.lr moves the LM's: schedule_jump names each part the run trains (`parts`) whose lr at that step moved, with
    both values; the part's schedule is train.lr's between its own bounds (floor: the share of its peak that min_lr is
    of lr, 1/10 here). Values by hand. (Before, only train.lr's schedule was compared: a vision_lr halved at a resume
    gave no warning at all.)"""
    from dataclasses import asdict

    from train.optim import schedule_jump

    shape = 0.5 * (1 + math.cos(math.pi * 40 / 90))   # cosine at step index 50 of 100, warm-up 10
    saved = asdict(cfg(lr_schedule="cosine", vision_lr=0.2, projector_lr=None))
    now = cfg(lr_schedule="cosine", vision_lr=0.1, projector_lr=None)
    vit_before, vit_now = 0.02 + 0.18 * shape, 0.01 + 0.09 * shape
    assert schedule_jump(saved, now, 50, parts=("vision_lr", "projector_lr")) == (
        f"the ViT's learning rate (train.vision_lr) of step 51 is {vit_now:.4g} under this launch's schedule, where "
        f"the checkpoint's gave {vit_before:.4g} (train.vision_lr 0.2 -> 0.1): it drops at once, without warm-up, "
        "and follows the new schedule from there")
    # a projector given a peak of its own at the resume (before: train.lr's), and train.lr raised with it
    moved = schedule_jump(saved, cfg(lr_schedule="cosine", lr=2.0, min_lr=0.2, vision_lr=0.2, projector_lr=0.5), 50,
                          parts=("vision_lr", "projector_lr"))
    lm_before, lm_now, proj_now = 0.1 + 0.9 * shape, 0.2 + 1.8 * shape, 0.05 + 0.45 * shape
    assert moved == (
        f"the learning rate of step 51 is {lm_now:.4g} under this launch's schedule, where the checkpoint's gave "
        f"{lm_before:.4g}; the projector's learning rate (train.projector_lr) of step 51 is {proj_now:.4g} under this "
        f"launch's schedule, where the checkpoint's gave {lm_before:.4g} (train.lr 1.0 -> 2.0; train.min_lr 0.1 -> "
        "0.2; train.projector_lr None -> 0.5): each moves at once, without warm-up, and follows the new schedule from "
        "there")
    # the ViT's peak and floor both scale with train.lr's here: its lr stays 0.2-to-0.02, not named
    assert "ViT" not in moved
    # a part the run does not train (not in `parts`), or a peak that gives the same lr at that step: no warning
    assert schedule_jump(saved, now, 50, parts=("projector_lr",)) == ""
    assert schedule_jump(asdict(cfg(lr_schedule="constant", vision_lr=0.2)),
                         cfg(lr_schedule="constant", vision_lr=0.2, warmup_steps=5), 30, parts=("vision_lr",)) == ""


def test_the_vision_tower_names_the_own_lr_settings_of_the_parts_it_trains():
    """VisionTower.lr_settings (what the trainer passes to schedule_jump) follows the optimizer's parameter groups:
    both parts, or the projector alone when the ViT is frozen."""
    from types import SimpleNamespace

    import torch

    from models.vision import VisionModel, tiny
    from train.vision import VisionTower, build_vision_optimizer

    torch.manual_seed(0)
    m = VisionModel(tiny(24))
    t = cfg(vision_lr=0.2)
    assert VisionTower.lr_settings(SimpleNamespace(optimizer=build_vision_optimizer(m, t))) == ("vision_lr",
                                                                                                 "projector_lr")
    m.vit.requires_grad_(False)
    assert VisionTower.lr_settings(SimpleNamespace(optimizer=build_vision_optimizer(m, t))) == ("projector_lr",)
    assert VisionTower.lr_settings(SimpleNamespace(optimizer=None)) == ()
