"""A step whose gradients hold a NaN or an Inf (train/trainer.py Trainer._nonfinite, _skip_or_stop): where it arose
and how the trainer says so.

The check runs after the gradients' reduction over ranks, where a NaN from one rank sits in every rank's shards;
each rank also notes its own loss and its own gradients before the reduction (GradsBeforeReduction), and the step's
one all-reduce carries those notes, so the message can name the ranks where it arose (NonFinite).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from megatron.core.distributed import finalize_model_grads

from data.sample_position import format_runs
from train.faults import poison_gradients, requested, scale_gradients
from train.metrics import NONFINITE_RECORDS, json_record

log = logging.getLogger(__name__)


def hosts_of(ranks: list[int], hosts: Sequence[str] = ()) -> str:
    """" (host node-b)", " (hosts node-a, node-b)": the hosts of `ranks` (`hosts`: every rank's, by rank), where the
    run spans several hosts (a user must find the node); "" on one host, or without `hosts`."""
    if len(set(hosts)) < 2:
        return ""
    named = list(dict.fromkeys(hosts[r] for r in ranks if r < len(hosts)))
    return f" (host{'s' if len(named) > 1 else ''} {', '.join(named)})" if named else ""


def format_ranks(ranks: list[int], hosts: Sequence[str] = ()) -> str:
    """"rank 3", "ranks 0-3, 8": runs of consecutive ranks as ranges; with `hosts` (every rank's host, by rank) and
    a run over several hosts, their hosts after them: "ranks 8-15 (host node-b)"."""
    return f"rank{'' if len(ranks) == 1 else 's'} {format_runs(ranks, sep='-')}{hosts_of(ranks, hosts)}"


@dataclass(frozen=True)
class NonFinite:
    """A step's gradients that held a NaN or an Inf (_nonfinite; the same on every rank): which (among "the language
    model's" and "the vision tower's"), and the ranks whose own losses, or own gradients before their reduction over
    ranks, were already not finite: where it arose, since the reduction spreads it to every rank."""

    grads: list[str]
    loss_ranks: list[int]
    grad_ranks: list[int]

    def __bool__(self) -> bool:
        return bool(self.grads)

    @property
    def origin(self) -> list[int]:
        """The ranks whose data to look at: those with a loss that was not finite, else those whose gradients were
        not (a backward's overflow). A forward's NaN reaches other ranks' gradients before the data-parallel
        reduction too, through the experts' exchange (their backward sums every rank's tokens), TP and PP."""
        return self.loss_ranks or self.grad_ranks

    def where(self, hosts: Sequence[str] = ()) -> str:
        """Where it arose, in words; `hosts`: every rank's host, by rank (named where the run spans several)."""
        parts = ([f"the loss on {format_ranks(self.loss_ranks, hosts)}"] * bool(self.loss_ranks)
                 + [f"the gradients on {format_ranks(self.grad_ranks, hosts)}"] * bool(self.grad_ranks))
        if not parts:
            return ("before their reduction over ranks, every rank's loss and gradients were finite: it arose in the "
                    "reduction or after it")
        return f"before their reduction over ranks, {' and '.join(parts)} were not finite"


def grad_norms(model: list) -> list[torch.Tensor]:
    """One norm per gradient buffer of the language model's DDP chunks (device tensors)."""
    return [buf.grad_data.norm() for m in model for buf in (*m.buffers, *m.expert_parallel_buffers)]


def part_ids(shape: torch.Size, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Which part of a micro-batch each of its tokens [b, S] belongs to (int64, on the device): in a packed row
    (cu_seqlens, b = 1) its document, the index of the segment holding it (a padding segment counts as one), else
    its row."""
    b, s = shape
    if cu_seqlens is None:
        return torch.arange(b, device=device).view(b, 1).expand(b, s)
    ends = cu_seqlens.reshape(-1)[1:].to(device=device, dtype=torch.int64)
    return torch.searchsorted(ends, torch.arange(s, device=device), right=True).view(1, s)


PARTS_KEY = "nonfinite_parts"   # the loss report's entry that nonfinite_parts fills (train/trainer.py _loss_func)
NOT_LOSS_TERMS = (PARTS_KEY, "part_loss")   # report entries that are no loss term (train/spikes.py PART_LOSS_KEY)


def nonfinite_parts(per_token_loss: torch.Tensor, parts: torch.Tensor, n_parts: int) -> torch.Tensor | None:
    """[n_parts] float, 1 for each part (part_ids, as this rank holds its tokens) holding a token whose loss was
    not finite, masked or not (a masked token's NaN makes the loss sum NaN too), else 0. On the device: no host
    copy. None where the loss is not per token in the parts' layout."""
    if per_token_loss.shape != parts.shape:
        return None
    bad = (~torch.isfinite(per_token_loss.detach())).reshape(-1).float()
    return bad.new_zeros(n_parts).scatter_reduce(0, parts.reshape(-1), bad, "amax")


def nonfinite_micro_batches(losses: list[dict], layer_kls: list[list[torch.Tensor]]) -> dict[int, list[int] | None]:
    """The step's micro-batches (their indices in it) whose loss terms were not finite on this rank: the losses
    (the last pipeline stage holds them) and each of this rank's DSA layers' indexer KLs (one per micro-batch, in
    order). Each maps to its parts (part_ids) whose tokens' loss was not finite, when some but not all were (the
    loss's `nonfinite_parts`), else None: the whole micro-batch (an indexer KL is one mean over its tokens, and a
    distillation loss is not per token). A host copy per value: only a non-finite step asks."""
    bad: dict[int, list[int] | None] = {}
    for i, d in enumerate(losses):
        terms = [v for k, v in d.items() if torch.is_tensor(v) and k not in NOT_LOSS_TERMS]
        if not all(bool(torch.isfinite(v).all()) for v in terms):
            flags = d.get(PARTS_KEY)
            some = [] if flags is None else [j for j, f in enumerate(flags.tolist()) if f]
            bad[i] = some if 0 < len(some) < len(flags) else None
    for kls in layer_kls:
        for i, kl in enumerate(kls):
            if i not in bad and not bool(torch.isfinite(kl).all()):
                bad[i] = None
    return dict(sorted(bad.items()))


def record_nonfinite_step(run_dir: str, step: int, bad: NonFinite, values: dict, data: Sequence[str],
                          samples: Sequence[dict], action: str, *, ranks: Sequence[int] | None = None) -> None:
    """Appends the run's record of a step whose gradients were not finite to <run_dir>/nonfinite.jsonl (rank 0; a
    line per such step, what the message says, for a script to read): the step, what the run did ("skipped" or
    "stopped"), the step's loss and its other metrics (`values`: a NaN as null, named in the field "nonfinite", as
    in metrics.jsonl: train/metrics.py json_record), the gradients and the ranks where it arose, and the data of
    those ranks in the step (`ranks`, by default bad.origin; the trainer gives each data once, not again for the
    TP, CP and PP ranks of a replica): `data`, as the message words it, and `samples`, as fields (the micro-batches
    named, or None for the whole step, and per stream its step_record: global samples and documents, or packs and
    their sample keys). A resumed launch moves the records of the steps it trains again to nonfinite.superseded.jsonl
    (train/metrics.py set_aside_redone)."""
    rec = {"step": step, "action": action, **values, "gradients": bad.grads, "loss_ranks": bad.loss_ranks,
           "grad_ranks": bad.grad_ranks, "data": {str(r): data[r] for r in (bad.origin if ranks is None else ranks)},
           "samples": {str(r): samples[r] for r in (bad.origin if ranks is None else ranks)}}
    try:
        with open(os.path.join(run_dir, NONFINITE_RECORDS), "a") as f:
            f.write(json_record(rec) + "\n")
    except OSError as e:   # the message in the logs says it all; a full disk must not end a run that may skip
        log.warning("could not record the non-finite step %d in %s: %s", step, NONFINITE_RECORDS, e)


class GradsBeforeReduction:
    """megatron's finalize_model_grads (the data-parallel reduction, then the TP and PP sums), after noting whether
    this rank's own gradients are finite (`finite`: a 0-dim device tensor; None before the step's backward): a NaN
    reaches every rank's shards in the reduction, so only this says where it arose (Trainer._nonfinite). One norm per
    buffer, kept on the device; `own_norm` (a 0-dim device tensor; None before the step's backward) is the norm of
    this rank's own gradients of the dense parameters, and of the experts' with `experts_own` (parallel.ep=1, each
    rank's experts see its own tokens alone: their norms are taken anyway, so they join at no cost; with
    parallel.ep > 1 a rank's expert gradients sum every EP rank's tokens routed to its experts, no replica's own),
    which its data-parallel peers hold the same shard of: a spiking step compares them (train/spikes.py
    rank_suspects). It holds neither the model nor the trainer: the transformer config that holds it as
    finalize_model_grads_func may outlive a trainer, which must be freed with its model."""

    def __init__(self, rank: int, *, experts_own: bool = False):
        self.rank, self.step, self.finite, self.own_norm = rank, 0, None, None
        self.experts_own = experts_own

    def __call__(self, model: list, *args, **kwargs):
        if requested("nan_backward_in_step", step=self.step, rank=self.rank):
            poison_gradients(model)
        if requested("spike_backward_in_step", step=self.step, rank=self.rank):
            scale_gradients(model)
        dense = [buf.grad_data.norm() for m in model for buf in m.buffers]
        norms = dense + [buf.grad_data.norm() for m in model for buf in m.expert_parallel_buffers]   # grad_norms'
        self.finite = torch.isfinite(torch.stack(norms)).all() if norms else None
        own = norms if self.experts_own else dense
        self.own_norm = torch.linalg.vector_norm(torch.stack(own)) if own else None
        return finalize_model_grads(model, *args, **kwargs)


class NonFiniteStepError(RuntimeError):
    """A step's gradients held a NaN or an Inf and train.skip_nonfinite_steps allowed no more skips."""
