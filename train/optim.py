"""Optimizer (megatron's distributed AdamW with fp32 master weights) and the learning-rate schedule.

The schedule is a pure function of the step, so its only state is the step counter in the checkpoint:
    warmup:   lr = lr_max * (step + 1) / warmup_steps              for step < warmup_steps
    cosine:   min + (max - min) * (1 + cos(pi * r)) / 2,  r = progress after warmup in [0, 1]
    linear:   min + (max - min) * (1 - r)
    wsd:      max until the last `wsd_decay_fraction` of the steps, then linear down to min
    constant: max
`step` is the 0-based index of the optimizer step about to be taken. Every parameter group follows it between its
own bounds (`max_lr`, `min_lr`): the LM's are train.lr and train.min_lr; the vision tower's ViT and projector groups
take train.vision_lr / train.projector_lr as their peak when set (part_lr_bounds).
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from train.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, *, max_lr: float | None = None, min_lr: float | None = None) -> float:
    hi = cfg.lr if max_lr is None else max_lr
    lo = cfg.min_lr if min_lr is None else min_lr
    if step < cfg.warmup_steps:
        return hi * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return hi
    span = max(1, cfg.steps - cfg.warmup_steps)
    r = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.lr_schedule == "cosine":
        return lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * r))
    if cfg.lr_schedule == "linear":
        return lo + (hi - lo) * (1.0 - r)
    # wsd: stable, then a linear decay over the final fraction of all steps
    decay_steps = max(1, int(round(cfg.wsd_decay_fraction * cfg.steps)))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return hi
    return lo + (hi - lo) * max(0.0, 1.0 - (step - decay_start) / decay_steps)


SCHEDULE_KEYS = ("lr", "min_lr", "lr_schedule", "warmup_steps", "steps", "wsd_decay_fraction")   # what lr_at reads


def schedule_jump(saved: dict, cfg: TrainConfig, step: int, *, parts: tuple[str, ...] = ()) -> str:
    """For a run resumed at `step` (the 0-based index of its next optimizer step) whose checkpoint recorded the train
    settings `saved`: "" where the schedule's settings are those or give the same lr at that step, else a sentence
    naming that step's lr under the checkpoint's settings and under `cfg`, and the settings that changed (a schedule
    is a function of the step: raising train.steps of a finished cosine run takes the lr from min_lr back up).
    `parts`: the own-peak settings of the vision tower's trained parts ("vision_lr", "projector_lr"), whose lr is
    judged the same way; a part without its own peak before and now has train.lr's lr, named once."""
    keys = SCHEDULE_KEYS + tuple(parts)
    changed = {k: (saved[k], getattr(cfg, k)) for k in keys if k in saved and saved[k] != getattr(cfg, k)}
    if not changed:
        return ""
    old = SimpleNamespace(**{k: saved.get(k, getattr(cfg, k)) for k in keys})
    jumps = []
    for name in ("lr", *parts):
        if name != "lr" and getattr(old, name) is None and getattr(cfg, name) is None:
            continue
        (hi0, lo0), (hi1, lo1) = (part_lr_bounds(c, None if name == "lr" else getattr(c, name)) for c in (old, cfg))
        before, now = lr_at(step, old, max_lr=hi0, min_lr=lo0), lr_at(step, cfg, max_lr=hi1, min_lr=lo1)
        if not math.isclose(before, now, rel_tol=1e-6, abs_tol=0.0):
            label = {"lr": "the learning rate", "vision_lr": "the ViT's learning rate (train.vision_lr)",
                     "projector_lr": "the projector's learning rate (train.projector_lr)"}[name]
            jumps.append((label, before, now))
    if not jumps:
        return ""
    said = "; ".join(f"{label} of step {step + 1} is {now:.4g} under this launch's schedule, where the checkpoint's "
                     f"gave {before:.4g}" for label, before, now in jumps)
    moves = (f"it {'rises' if jumps[0][2] > jumps[0][1] else 'drops'}" if len(jumps) == 1 else "each moves")
    return (f"{said} ({'; '.join(f'train.{k} {a!r} -> {b!r}' for k, (a, b) in changed.items())}): {moves} at once, "
            "without warm-up, and follows the new schedule from there")


def part_lr_bounds(cfg: TrainConfig, peak: float | None) -> tuple[float, float]:
    """(max_lr, min_lr) of a part whose own peak lr is `peak` (train.vision_lr or train.projector_lr): None gives
    train.lr and train.min_lr; a peak of its own decays to the same share of it as train.min_lr is of train.lr (0
    with train.lr 0), so each part's schedule has the LM's shape scaled by its peak, as a schedule that multiplies
    every group's initial lr by one factor gives (ms-swift's vit_lr / aligner_lr, LLaVA's mm_projector_lr)."""
    if peak is None:
        return cfg.lr, cfg.min_lr
    return peak, peak * cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0


def apply_lr(optimizer, step: int, cfg: TrainConfig) -> float:
    """Sets lr and weight decay of every parameter group for `step`; returns the base lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg, max_lr=group.get("max_lr"), min_lr=group.get("min_lr"))
        group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)
    return lr_at(step, cfg)


def check_param_dtypes(model_chunks, *, bf16: bool, distributed: bool) -> None:
    """A bf16 model under megatron-core 0.16.1's distributed optimizer must hold no trainable fp32 parameter.

    Such a parameter gets a grad buffer of its own dtype, and the optimizer's checkpoint code then fails: in a
    parameter group shared with bf16 parameters it pairs parameters with each other's main copies and Adam state
    (model order vs the inner optimizer's fp32-first order; the save stops on a shape assertion, or swaps states
    silently where the shapes agree), and a data-parallel shard that holds none of the small fp32 buffer stops
    it with "empty bucket encountered". Both surfaced only at the first checkpoint of a GPU run, so this stops
    the run at start instead. Keep the weight in the model's dtype and compute in fp32 where it matters (the
    DSA indexer's key LayerNorm does: models/attention/dsa.py); the optimizer keeps fp32 master weights anyway.
    """
    if not (bf16 and distributed):
        return
    bad = [f"{name} ({p.dtype}, shape {list(p.shape)})" for chunk in model_chunks for name, p in chunk.named_parameters()
           if p.requires_grad and p.dtype == torch.float32]
    if bad:
        raise ValueError(f"trainable fp32 parameters in a bf16 model: {', '.join(bad[:4])}"
                         f"{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}; megatron-core 0.16.1's distributed "
                         "optimizer cannot checkpoint them (train/optim.check_param_dtypes): store them in bf16 "
                         "and compute in fp32 in the forward")


def build_optimizer(model_chunks, cfg: TrainConfig, *, bf16: bool, distributed: bool, pg_collection):
    check_param_dtypes(model_chunks, bf16=bf16, distributed=distributed)
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.grad_clip,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
        decoupled_weight_decay=True,
    )
    return get_megatron_optimizer(opt_cfg, model_chunks, pg_collection=pg_collection, use_gloo_process_groups=False)


# the parameter groups' hyper-parameters that build_optimizer sets from the config (train.lr, train.min_lr,
# train.adam_beta1/2, train.adam_eps); lr and weight_decay are set for every step by apply_lr
CONFIGURED_GROUP_KEYS = ("max_lr", "min_lr", "betas", "eps")


@contextlib.contextmanager
def keep_configured_hyperparameters(optimizer):
    """Around loading a checkpoint's optimizer state: the parameter groups keep the hyper-parameters this launch
    configured (CONFIGURED_GROUP_KEYS) instead of the checkpoint's. megatron-core 0.16.1's loaders hand torch
    every group as the checkpoint stored it, so a resume with another train.lr, min_lr, adam_beta1/2 or adam_eps
    went on with the old values while the log (and the vision tower's optimizer) used the new ones. The groups'
    optimizer state (a fully_reshardable checkpoint's `step`) stays the checkpoint's."""
    def groups():
        return [g for opt in torch_optimizers(optimizer) for g in opt.param_groups]

    configured = [{k: g[k] for k in CONFIGURED_GROUP_KEYS if k in g} for g in groups()]
    yield
    loaded = groups()
    assert len(loaded) == len(configured), (len(loaded), len(configured))
    for group, values in zip(loaded, configured):
        group.update(values)


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside megatron's (possibly chained, possibly distributed) optimizer."""
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [getattr(o, "optimizer", o) for o in chained]


def untie_adam_steps(optimizer) -> None:
    """Gives every parameter its own Adam `step` tensor.

    megatron-core 0.16.1's distributed optimizer, loading a checkpoint without apex/TE, puts ONE shared
    `step` tensor into every parameter's state; torch's AdamW increments it in place once per parameter,
    so bias correction is wrong from the first resumed step on and training silently diverges.
    """
    for opt in torch_optimizers(optimizer):
        for state in opt.state.values():
            if "step" in state and torch.is_tensor(state["step"]):
                state["step"] = state["step"].detach().clone()


def ensure_adam_state(optimizer) -> None:
    """Allocates zero Adam state for parameters that have none yet.

    megatron-core 0.16.1's distributed optimizer, without apex/TE, asserts in `state_dict()` (called
    while building the sharded state dict for loading) when the torch optimizer has no state yet.
    The values written here are overwritten by the load.
    """
    for opt in torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                    state["step"] = torch.tensor(0.0)


def patch_step_restore(optimizer) -> None:
    """Lets megatron-core 0.16.1's distributed optimizer load its checkpoints without TE/apex.

    Its loader copies every key of a parameter's live Adam state from the checkpoint. A fully_reshardable
    checkpoint's per-parameter tensors have no `step` (restored separately, from the param groups), so
    loading raised KeyError: 'step'; a dp_reshardable one returns a stale placeholder step that would
    overwrite the restored one with 0 (resumed training then diverges). The restored step is kept.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        if not isinstance(opt, DistributedOptimizer) or getattr(opt, "_step_restore_patched", False):
            continue
        original = opt._set_main_param_and_optimizer_states

        def patched(model_param, tensors, _opt=opt, _original=original):
            # The step restored from the param groups is kept: a fully_reshardable checkpoint has no
            # per-parameter step, and a dp_reshardable one hands back the step the state had when the
            # load request was built (a non-persistent placeholder, 0 on a fresh optimizer).
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            step = _opt.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
            else:
                tensors = {k: v for k, v in tensors.items() if k != "step"}
            # the dp_reshardable loader calls this outside no_grad: an in-place copy into a leaf fp32 main
            # param that requires grad would raise
            with torch.no_grad():
                return _original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = patched
        opt._step_restore_patched = True
