"""The vision tower's own learning rates (train.vision_lr for the ViT, train.projector_lr for the projector): each
part's parameter groups follow train.lr's schedule between that part's bounds, its AdamW update is torch's at that lr,
and a resume with another vision_lr takes it from its next step. The reference schedule is train/optim.lr_at of a
config whose train.lr and min_lr are the part's (lr_at itself is checked against hand-computed values in
test_schedule.py); the reference update is torch.optim.AdamW over a copy of the weight, its lr set per step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.vision import VisionModel, tiny
from train.config import TrainConfig
from train.optim import apply_lr, lr_at
from train.vision import build_vision_optimizer

LR, MIN_LR, VIT_LR, PROJ_LR = 1e-3, 1e-4, 2e-4, 5e-3
# each part's floor: the share of its peak that train.min_lr is of train.lr (1/10 here), written out
FLOOR = {VIT_LR: 2e-5, PROJ_LR: 5e-4, 1e-3: 1e-4}


def part_schedule(t: TrainConfig, peak: float | None) -> TrainConfig:
    """The same schedule with the part's bounds as train.lr / min_lr: its peak and its floor (FLOOR, for configs with
    min_lr = lr / 10); None: train.lr's own."""
    if peak is None:
        return t
    assert t.min_lr * 10 == t.lr, (t.min_lr, t.lr)
    return dataclasses.replace(t, lr=peak, min_lr=FLOOR[peak], vision_lr=None, projector_lr=None)


def _model(seed: int = 0) -> VisionModel:
    torch.manual_seed(seed)
    return VisionModel(tiny(24))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
@pytest.mark.parametrize("proj_lr", [PROJ_LR, None])
def test_each_parts_parameter_groups_follow_the_schedule_between_that_parts_bounds(schedule, proj_lr):
    t = TrainConfig(steps=20, warmup_steps=4, lr=LR, min_lr=MIN_LR, vision_lr=VIT_LR, projector_lr=proj_lr,
                    lr_schedule=schedule, wsd_decay_fraction=0.25)
    m = _model()
    opt = build_vision_optimizer(m, t)
    vit = {id(p) for p in m.vit.parameters()}
    projector = {id(p) for p in m.projector.parameters()}
    # every trainable parameter in exactly one group, the ViT's and the projector's apart
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in m.parameters())
    for g in opt.param_groups:
        assert {id(p) for p in g["params"]} <= (vit if g["part"] == "vit" else projector), g["part"]
    want = {"vit": part_schedule(t, VIT_LR), "projector": part_schedule(t, proj_lr)}
    for step in (0, 2, 3, 4, 8, 14, 16, 19, 20):   # warm-up, its last step, stable / decaying, the floor
        base = apply_lr(opt, step, t)
        assert base == lr_at(step, t)   # the LM's, as logged
        for g in opt.param_groups:
            # the floor is computed there (peak * min_lr / lr: 2 float64 roundings) and written out here, and the
            # schedule then mixes it with the peak: a few ulp, relative 1e-14; a floor of train.min_lr's or a peak of
            # train.lr's would be off by 10% and more
            assert g["lr"] == pytest.approx(lr_at(step, want[g["part"]]), rel=1e-14, abs=0), (step, g["part"])
            if g["part"] == "projector" and proj_lr is None:
                assert g["lr"] == base
    assert {g["part"] for g in opt.param_groups} == {"vit", "projector"}


def test_a_vit_weight_steps_as_torch_adamw_at_the_vision_lr():
    """Three steps on fixed gradients: a ViT weight matrix (decayed), a ViT LayerNorm weight (not decayed) and a
    projector weight against torch.optim.AdamW over copies, each at its part's lr for the step. Same fp32 operations
    in the same order: bit-identical."""
    t = TrainConfig(steps=10, warmup_steps=2, lr=LR, min_lr=MIN_LR, vision_lr=VIT_LR, projector_lr=PROJ_LR,
                    weight_decay=0.1)
    m = _model()
    opt = build_vision_optimizer(m, t)
    picks = {"vit.blocks.0.attn.qkv.weight": (VIT_LR, t.weight_decay), "vit.blocks.0.norm1.weight": (VIT_LR, 0.0),
             "projector.fc1.weight": (PROJ_LR, t.weight_decay)}
    params = dict(m.named_parameters())
    assert set(picks) <= set(params), sorted(params)[:12]
    refs = {n: torch.nn.Parameter(params[n].detach().clone()) for n in picks}
    ref_opts = {n: torch.optim.AdamW([refs[n]], lr=1.0, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                     weight_decay=wd) for n, (_, wd) in picks.items()}
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        for n, p in params.items():
            p.grad = torch.randn(p.shape, generator=g)
        for n, (peak, _) in picks.items():
            refs[n].grad = params[n].grad.clone()
            ref_opts[n].param_groups[0]["lr"] = lr_at(step, part_schedule(t, peak))
            ref_opts[n].step()
        apply_lr(opt, step, t)
        opt.step()
        for n in picks:
            assert torch.equal(params[n].detach(), refs[n].detach()), (step, n)
    # and the weight moved by the vision lr, not train.lr's: a step at 5x the lr would be another value
    assert not torch.equal(params["vit.blocks.0.attn.qkv.weight"].detach(), _model().vit.blocks[0].attn.qkv.weight)


def test_a_resume_with_another_vision_lr_takes_it_from_its_next_step():
    """The trainer's resume of the vision tower in one process: 2 steps at vision_lr=2e-4, the tower's checkpoint
    tensors (sharded_state: weights and Adam moments) copied into a tower built with vision_lr=1e-3 as
    train/checkpoint.load_checkpoint copies them (the disk round trip itself: tests/dist/test_vision_layout_parity.py,
    tests/integration/test_tiny_recipe.py), its step count restored, and one more step. A ViT weight equals torch
    AdamW's run over steps 0-1 at the old lr and step 2 at the new one; the step logs the new lr, and the setting is
    the one the resume logs as changed."""
    from dataclasses import asdict

    from tests.launch_util import destroy_one_process_megatron, init_one_process_megatron
    from tests.unit.test_config import _validate
    from train.config import config_changes
    from train.vision import VisionTower

    common = ("recipe=keye_tiny", "parallel=single", "train.steps=10", "train.warmup_steps=1", "train.lr=1e-3",
              "train.min_lr=1e-4", "train.lr_schedule=cosine")
    old_lr, new_lr = 2e-4, 1e-3
    name = "vit.blocks.0.attn.qkv.weight"
    pgs = init_one_process_megatron(3)
    try:
        cfg_a, layout = _validate(*common, f"train.vision_lr={old_lr}", world_size=1)
        cfg_b, _ = _validate(*common, f"train.vision_lr={new_lr}", world_size=1)
        assert config_changes(asdict(cfg_a), asdict(cfg_b)) == [("train.vision_lr", old_lr, new_lr)]
        tower = VisionTower(cfg_a, layout, pgs, torch.device("cpu"), train_vit=True, train_projector=True, bf16=False)
        ref = torch.nn.Parameter(dict(tower.model.named_parameters())[name].detach().clone())
        t = cfg_a.train
        ref_opt = torch.optim.AdamW([ref], lr=1.0, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                    weight_decay=t.weight_decay)
        g = torch.Generator().manual_seed(2)
        grads = [{n: torch.randn(p.shape, generator=g) for n, p in tower.model.named_parameters()} for _ in range(3)]

        def step(tw: VisionTower, i: int, lr: float) -> None:
            for n, p in tw.model.named_parameters():
                p.grad = grads[i][n].clone()
            tw.update(i)
            ref.grad = grads[i][name].clone()
            ref_opt.param_groups[0]["lr"] = lr
            ref_opt.step()

        for i in range(2):
            step(tower, i, lr_at(i, part_schedule(t, old_lr)))
        resumed = VisionTower(cfg_b, layout, pgs, torch.device("cpu"), train_vit=True, train_projector=True,
                              bf16=False)
        saved = tower.sharded_state()
        for k, sh in resumed.sharded_state().items():   # train/checkpoint.load_checkpoint's copy into `extra`
            sh.data.copy_(saved[k].data)
        resumed.restore_steps(tower.steps)               # the checkpoint's vision_steps
        want = lr_at(2, part_schedule(cfg_b.train, new_lr))
        assert resumed.lrs(2) == {"vision_lr": want}   # what the step logs beside the LM's lr
        step(resumed, 2, want)
        assert torch.equal(dict(resumed.model.named_parameters())[name].detach(), ref.detach())
        # a tower built afresh at the old lr and stepped at it is another weight: the new lr made the difference
        assert not torch.equal(dict(tower.model.named_parameters())[name].detach(), ref.detach())
    finally:
        destroy_one_process_megatron()


def test_a_checkpoint_from_before_the_part_lrs_resumes_without_naming_them_changed():
    """A checkpoint's recorded config from before train.vision_lr / projector_lr existed lacks them: the resume's
    "settings changed" line named both ("train.projector_lr '<absent>' -> None; train.vision_lr '<absent>' -> None")
    though the run trains as before. Left at null they are no change; set, they are one, as is any other change."""
    from types import SimpleNamespace

    from tests.unit.test_config import _validate
    from train.trainer import Trainer

    old = dataclasses.asdict(_validate("recipe=keye_tiny")[0])   # keye_tiny's train.lr: 3e-3
    for k in ("vision_lr", "projector_lr"):
        del old["train"][k]

    def changed(*overrides: str) -> str:
        cfg, _ = _validate("recipe=keye_tiny", *overrides)
        return Trainer._changed_since(SimpleNamespace(cfg=cfg), {"config": old})

    assert changed() == ""
    assert changed("train.vision_lr=1e-4") == "train.vision_lr '<absent>' -> 0.0001"
    assert changed("train.lr=1e-3") == "train.lr 0.003 -> 0.001"
