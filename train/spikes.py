"""A step whose gradient norm spikes (train.spike; train/trainer.py Trainer._spike_skip_or_stop): the decision, the
window it rests on, and the optimizer step split around it.

The norms judged are the global gradient norms before clipping, the language model's (megatron's get_grad_norm: reduced
over data-parallel, tensor, pipeline and expert ranks, all stages) and the vision tower's (VisionTower.reduce_grads):
the same on every rank, so every rank decides the same without a collective of its own (but with train.grad_clip=0,
where megatron's step computes no norm: norm_before_step). The norm, not the loss, is judged: it is what moves the
weights, and it is known before the step is applied (the step's loss is summed over the world after it, with the step's
other metrics).
"""

from __future__ import annotations

import logging
import os
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from train.metrics import SPIKE_RECORDS, json_record

log = logging.getLogger(__name__)

NORM_NAMES = {"grad_norm": "the language model's", "vit_grad": "the vision tower's"}


@dataclass(frozen=True)
class Spike:
    """A norm of the step that exceeded factor x its window's median."""

    name: str   # "grad_norm" (the language model's) or "vit_grad" (the vision tower's)
    norm: float
    median: float

    def describe(self, factor: float, window: int) -> str:
        return (f"{NORM_NAMES[self.name]} gradient norm {self.norm:.6g} is {self.norm / self.median:.3g} x the median "
                f"{self.median:.6g} of the last {window} applied steps' (more than train.spike.factor={factor:g})")


class SpikeWindow:
    """The last `window` applied steps' gradient norms, per norm (NORM_NAMES). `check` judges a step's norms against
    them; `add` appends an applied step's. A step is judged only once its norm's window is full; a median of 0 (a
    part that does not train) judges nothing."""

    def __init__(self, factor: float, window: int):
        self.factor, self.window = factor, window
        self.norms: dict[str, deque[float]] = {}

    def check(self, norms: dict[str, float]) -> list[Spike]:
        out = []
        for name, value in norms.items():
            past = self.norms.get(name, ())
            if len(past) < self.window:
                continue
            median = statistics.median(past)
            if median > 0 and value > self.factor * median:
                out.append(Spike(name, value, median))
        return out

    def add(self, norms: dict[str, float]) -> None:
        for name, value in norms.items():
            self.norms.setdefault(name, deque(maxlen=self.window)).append(float(value))

    def state_dict(self) -> dict:
        return {"norms": {k: list(v) for k, v in self.norms.items()}}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's window; one written with another train.spike.window gives its last `window` norms."""
        self.norms = {k: deque((float(x) for x in v), maxlen=self.window) for k, v in state["norms"].items()}


def norm_before_step(optimizer) -> float | None:
    """The first half of megatron's optimizer step: the gradients made ready (prepare_grads) and their global norm
    before clipping (get_grad_norm: the collective megatron's step runs to clip; with train.grad_clip=0, which
    megatron's step computes no norm for, the one collective this adds). None when prepare_grads found a NaN or an
    Inf (megatron's step then reports failure). apply_step finishes the step."""
    if optimizer.prepare_grads():
        return None
    return float(optimizer.get_grad_norm())


def apply_step(optimizer, grad_norm: float) -> bool:
    """The second half of megatron's step (ChainedOptimizer.step; MixedPrecision- and FP32Optimizer.step clip by the
    same norm): each optimizer's gradients clipped by the total norm, then the update. Returns its success."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                                         use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return optimizer.step_with_ready_grads()


def record_spike_step(run_dir: str, step: int, spikes: Sequence[Spike], values: dict, data: dict[int, str],
                      samples: dict[int, dict], action: str) -> None:
    """Appends a spiking step's record to <run_dir>/spikes.jsonl (rank 0), as train/nonfinite.py record_nonfinite_step
    does for a non-finite step: the step, "skipped" or "stopped", its loss and metrics, each spiking norm with its
    window's median, and the data in the step of every rank whose data no rank before it read (the spike is the whole
    step's: its norm is the world's), by rank, as worded and as fields (`samples`, which data.exclude reads)."""
    rec = {"step": step, "action": action, **values,
           "spikes": [{"norm": s.name, "value": s.norm, "median": s.median} for s in spikes],
           "data": {str(r): d for r, d in data.items()}, "samples": {str(r): s for r, s in samples.items()}}
    try:
        with open(os.path.join(run_dir, SPIKE_RECORDS), "a") as f:
            f.write(json_record(rec) + "\n")
    except OSError as e:   # the message in the logs says it all
        log.warning("could not record the spiking step %d in %s: %s", step, SPIKE_RECORDS, e)


class SpikeStepError(RuntimeError):
    """A step's gradient norm spiked and train.spike.skip_steps allowed no more skips."""
