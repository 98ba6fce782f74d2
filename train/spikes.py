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

import torch
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from data.sample_position import format_runs
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
                      samples: dict[int, dict], action: str, *, suspects: Sequence[dict] = (),
                      replicas: dict | None = None) -> None:
    """Appends a spiking step's record to <run_dir>/spikes.jsonl (rank 0), as train/nonfinite.py record_nonfinite_step
    does for a non-finite step: the step, "skipped" or "stopped", its loss and metrics, each spiking norm with its
    window's median, and the data in the step of every rank whose data no rank before it read (the spike is the whole
    step's: its norm is the world's), by rank, as worded and as fields (`samples`, which data.exclude reads); then
    `suspects` (rank_suspects, most likely first, each with its own `samples`, which data.exclude_spikes=suspect
    reads instead of the whole step's) and `replicas` (each replica's largest own gradient norm and its ratio, and its
    vision tower's where known)."""
    rec = {"step": step, "action": action, **values,
           "spikes": [{"norm": s.name, "value": s.norm, "median": s.median} for s in spikes],
           "data": {str(r): d for r, d in data.items()}, "samples": {str(r): s for r, s in samples.items()},
           "suspects": [{k: v for k, v in s.items() if k != "words"} for s in suspects], "replicas": replicas or {}}
    try:
        with open(os.path.join(run_dir, SPIKE_RECORDS), "a") as f:
            f.write(json_record(rec) + "\n")
    except OSError as e:   # the message in the logs says it all
        log.warning("could not record the spiking step %d in %s: %s", step, SPIKE_RECORDS, e)


class SpikeStepError(RuntimeError):
    """A step's gradient norm spiked and train.spike.skip_steps allowed no more skips."""


# ------------------------------------------------------------------------------------------------------------------
# Which data made the step spike. The norm judged is the world's; what points at one rank's micro-batch, with no
# second backward, is (a) each micro-batch's own mean loss, and each of its documents' or rows' (the loss report's
# PART_LOSS_KEY), against the step's other micro-batches, and (b) each rank's own gradient norm before the
# data-parallel reduction (GradsBeforeReduction.own_norm: the trainer's DDP reduces with overlap_grad_reduce off, so
# the buffers hold this rank's own accumulated gradients until finalize_model_grads; a per-micro-batch norm would
# need a norm of the buffers after every micro-batch's backward), and its vision tower's (VisionTower.own_grads: of
# the frames it encoded, its replica's, before their sum over the world). Gathered at a spiking step alone.

PART_LOSS_KEY = "part_loss"   # the loss report's [2, n_parts]: each document's or row's loss sum and loss tokens
SUSPECTS = 3                  # the micro-batches a spiking step's record and message rank, at most
_MAD_SIGMA = 1.4826           # a normal distribution's standard deviation over its median absolute deviation
# What makes a micro-batch stand out (rank_suspects lists only those, or its best guess alone): its loss's robust
# z-score (the modified z-score) above 3.5, Iglewicz and Hoaglin's cut for outliers (a normal sample passes it about
# 2 times in 10,000), or its replica's own gradient norm at least 1.5 x its peers' median. At 1.5 a rank of two (their
# median is their mean) stands out when its norm is 3 x the other's, which one rank's bad batch gives (the fault
# drill's, spike_backward_in_step: a ratio of about 2.0 against 0.0); a spike the norm judges is a factor of several
# (train.spike.factor), far above the spread of ranks on like data. Below the cut a ratio is noise and must not rank
# one replica's ordinary micro-batches before another's outlying loss.
Z_STANDS_OUT = 3.5
NORM_STANDS_OUT = 1.5


def part_losses(per_token_loss: torch.Tensor, mask: torch.Tensor, parts: torch.Tensor, n_parts: int
                ) -> torch.Tensor | None:
    """[2, n_parts] float64: each part's (part_ids, as this rank holds its tokens) masked loss sum and loss tokens,
    on the device (no host copy: a normal step pays one scatter and 16 bytes a part). None where the loss is not per
    token in the parts' layout."""
    if per_token_loss.shape != parts.shape:
        return None
    m = mask.reshape(-1).double()
    out = m.new_zeros(2, n_parts)
    idx = parts.reshape(-1)
    out[0].scatter_add_(0, idx, per_token_loss.detach().reshape(-1).double() * m)
    out[1].scatter_add_(0, idx, m)
    return out


def micro_batch_losses(losses: list[dict]) -> list[dict]:
    """This rank's share of each of the step's micro-batches' loss (in order): {"loss": sum, "tokens": n, "parts":
    [[sum, n] per document or row] or None}. Host copies: a spiking step alone asks."""
    out = []
    for d in losses:
        loss_sum, tokens = (float(x) for x in d["lm_loss"][:2].tolist())
        parts = d.get(PART_LOSS_KEY)
        out.append({"loss": loss_sum, "tokens": tokens, "parts": None if parts is None else parts.t().tolist()})
    return out


def _robust_z(value: float, values: list[float]) -> float:
    """(value - median) / (1.4826 x the median absolute deviation) of `values`; over their standard deviation where
    more than half are equal (a MAD of 0), and 0 where they do not spread at all."""
    median = statistics.median(values)
    spread = statistics.median(abs(v - median) for v in values) * _MAD_SIGMA
    if spread == 0 and len(values) > 1:
        spread = statistics.pstdev(values)
    return (value - median) / spread if spread > 0 else 0.0


def _ratios(norms: Sequence[float | None], peers: Sequence[tuple]) -> list[float | None]:
    """Each rank's norm over the median of its peers' (those of the same key; 1 where that median is 0; None
    without a norm)."""
    by_peers: dict[tuple, list[float]] = {}
    for n, key in zip(norms, peers):
        if n is not None:
            by_peers.setdefault(tuple(key), []).append(n)
    out = []
    for n, key in zip(norms, peers):
        median = None if n is None else statistics.median(by_peers[tuple(key)])
        out.append(None if n is None else n / median if median > 0 else 1.0)
    return out


def rank_suspects(owners: Sequence[int], shares: Sequence[list[dict]], own_norms: Sequence[float | None],
                  peers: Sequence[tuple], top: int = SUSPECTS, *, vit_norms: Sequence[float | None] = ()
                  ) -> tuple[list[dict], dict[int, dict]]:
    """The micro-batches most likely to have made the step's norm spike, from every rank's gathered numbers (by rank):
    `owners[r]` the first rank reading rank r's data (TP, CP and PP ranks of one replica read the same), `shares[r]`
    rank r's micro_batch_losses (empty but on the ranks that count the loss: the last pipeline stage's TP rank 0;
    the CP ranks of a replica each hold a share of its tokens, summed here), `own_norms[r]` rank r's gradient norm
    before the reduction (None: none) and `peers[r]` what makes two ranks' norms comparable (the same model shard and
    share of a replica's tokens: pipeline, tensor and CP rank; a replica's CP ranks are not each other's peers).
    Returns (suspects, the replicas' norms): micro-batches ordered by their replica's
    largest own-norm ratio (a rank's norm over the median of its peers', 1 without peers) where it stands out
    (NORM_STANDS_OUT; below it, as 1), then by their mean loss (its robust z-score against the step's micro-batches);
    of them the first `top` that stand out (their replica's ratio, or their z-score, Z_STANDS_OUT), or where none
    does the first alone (the best guess, "stands_out" false); each {"rank": owner, "micro_batch": i, "loss": mean,
    "tokens", "median": the step's median micro-batch loss, "z", "norm_ratio", "stands_out", "part": the document or
    row of the highest mean loss (None: not known), "part_loss"}; the replicas' {owner: {"rank": the rank of the
    largest ratio, "own_norm", "norm_ratio"}}. `vit_norms[r]` (optional) rank r's own vision-tower gradient norm
    (VisionTower.own_grads: of the frames it encoded, its replica's), over the median of every rank's (the tower is
    whole on every rank): a replica's largest, "vit_norm_ratio" in both, counts as its norm ratio does (the larger of
    the two that stand out ranks), so that a spike of the vision tower alone points at a replica too."""
    merged: dict[tuple[int, int], dict] = {}
    for r, share in enumerate(shares):
        for i, mb in enumerate(share):
            m = merged.setdefault((owners[r], i), {"loss": 0.0, "tokens": 0.0, "parts": None})
            m["loss"] += mb["loss"]
            m["tokens"] += mb["tokens"]
            if mb["parts"] is not None:
                m["parts"] = ([list(p) for p in mb["parts"]] if m["parts"] is None else
                              [[a + x, b + y] for (a, b), (x, y) in zip(m["parts"], mb["parts"])])
    replicas: dict[int, dict] = {}
    for r, (n, ratio) in enumerate(zip(own_norms, _ratios(own_norms, peers))):
        if n is not None and (owners[r] not in replicas or ratio > replicas[owners[r]]["norm_ratio"]):
            replicas[owners[r]] = {"rank": r, "own_norm": n, "norm_ratio": ratio}
    vit = {}   # a replica's largest own vision-tower norm ratio
    for r, ratio in enumerate(_ratios(vit_norms, [()] * len(vit_norms))):
        if ratio is not None and ratio > vit.get(owners[r], 0.0):
            vit[owners[r]] = ratio
            replicas.setdefault(owners[r], {"rank": r, "own_norm": None, "norm_ratio": 1.0})
            replicas[owners[r]].update(vit_rank=r, vit_own_norm=vit_norms[r], vit_norm_ratio=ratio)
    means = {k: m["loss"] / m["tokens"] for k, m in merged.items() if m["tokens"] > 0}
    if not means:
        return [], replicas
    median = statistics.median(means.values())
    out = []
    for (owner, i), mean in means.items():
        parts = [(j, s / n) for j, (s, n) in enumerate(merged[(owner, i)]["parts"] or []) if n > 0]
        part, part_loss = max(parts, key=lambda p: p[1]) if parts else (None, None)
        ratio, z = replicas.get(owner, {}).get("norm_ratio", 1.0), _robust_z(mean, list(means.values()))
        either = max(ratio, vit.get(owner, 1.0))
        out.append({"rank": owner, "micro_batch": i, "loss": mean, "tokens": merged[(owner, i)]["tokens"],
                    "median": median, "z": z, "norm_ratio": ratio, **({"vit_norm_ratio": vit[owner]} if owner in vit
                                                                       else {}),
                    "stands_out": either >= NORM_STANDS_OUT or z > Z_STANDS_OUT, "part": part, "part_loss": part_loss})
    out.sort(key=lambda s: (-max(r if r >= NORM_STANDS_OUT else 1.0 for r in (s["norm_ratio"],
                                                                               s.get("vit_norm_ratio", 1.0))),
                            -s["loss"], s["rank"], s["micro_batch"]))
    return [s for s in out if s["stands_out"]][:top] or out[:1], replicas


def describe_suspect(s: dict, samples: str) -> str:
    """"rank 3 micro-batch 1 (global samples 13): loss 9.1 against the step's median 2.3 (z 5.2), its document 0's
    9.8; rank 3's own gradient norm 4.1 x its peers' median": a suspect of rank_suspects, with its samples in words
    (and, for a best guess that stands out by neither, that it does not)."""
    part = "" if s["part"] is None else f", its document or row {s['part']}'s {s['part_loss']:.4g}"
    norm = "" if s["norm_ratio"] == 1.0 else \
        f"; the replica's own gradient norm before the reduction {s['norm_ratio']:.3g} x its peers' median"
    if s.get("vit_norm_ratio", 1.0) != 1.0:
        norm += f"; its own vision-tower gradient norm {s['vit_norm_ratio']:.3g} x every rank's median"
    guess = "" if s.get("stands_out", True) else \
        "; a best guess: neither its loss nor its replica's own gradient norm stands out"
    return (f"rank {s['rank']} micro-batch {s['micro_batch']} ({samples}): loss {s['loss']:.4g} against the step's "
            f"median {s['median']:.4g} (z {s['z']:.3g}){part}{norm}{guess}")


def sample_words(streams: list[dict]) -> str:
    """The samples a stream's step_record names, in words: video sample keys, token files' documents, else the
    global sample numbers (synthetic text)."""
    out = []
    for s in streams:
        keys = [k for p in s.get("packs", []) for k in p.get("samples", [])]
        docs = [f"{f}#{n}" for f, n in s.get("documents", [])]
        if keys or docs:
            out.append("samples " + ", ".join(keys + docs))
        elif s.get("global_samples"):
            out.append(f"global samples {format_runs(s['global_samples'])}")
    return "; ".join(out) or "no sample named"
