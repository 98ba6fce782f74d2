"""A step whose gradients hold a NaN or an Inf (train/trainer.py Trainer._nonfinite, _skip_or_stop): where it arose
and how the trainer says so.

The check runs after the gradients' reduction over ranks, where a NaN from one rank sits in every rank's shards;
each rank also notes its own loss and its own gradients before the reduction (GradsBeforeReduction), and the step's
one all-reduce carries those notes, so the message can name the ranks where it arose (NonFinite).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.distributed import finalize_model_grads

from data.sample_position import format_runs
from train.faults import poison_gradients, requested


def format_ranks(ranks: list[int]) -> str:
    """"rank 3", "ranks 0-3, 8": runs of consecutive ranks as ranges."""
    return f"rank{'' if len(ranks) == 1 else 's'} {format_runs(ranks, sep='-')}"


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

    def where(self) -> str:
        parts = ([f"the loss on {format_ranks(self.loss_ranks)}"] * bool(self.loss_ranks)
                 + [f"the gradients on {format_ranks(self.grad_ranks)}"] * bool(self.grad_ranks))
        if not parts:
            return ("before their reduction over ranks, every rank's loss and gradients were finite: it arose in the "
                    "reduction or after it")
        return f"before their reduction over ranks, {' and '.join(parts)} were not finite"


def grad_norms(model: list) -> list[torch.Tensor]:
    """One norm per gradient buffer of the language model's DDP chunks (device tensors)."""
    return [buf.grad_data.norm() for m in model for buf in (*m.buffers, *m.expert_parallel_buffers)]


class GradsBeforeReduction:
    """megatron's finalize_model_grads (the data-parallel reduction, then the TP and PP sums), after noting whether
    this rank's own gradients are finite (`finite`: a 0-dim device tensor; None before the step's backward): a NaN
    reaches every rank's shards in the reduction, so only this says where it arose (Trainer._nonfinite). One norm per
    buffer, kept on the device. It holds neither the model nor the trainer: the transformer config that holds it
    as finalize_model_grads_func may outlive a trainer, which must be freed with its model."""

    def __init__(self, rank: int):
        self.rank, self.step, self.finite = rank, 0, None

    def __call__(self, model: list, *args, **kwargs):
        if requested("nan_backward_in_step", step=self.step, rank=self.rank):
            poison_gradients(model)
        norms = grad_norms(model)
        self.finite = torch.isfinite(torch.stack(norms)).all() if norms else None
        return finalize_model_grads(model, *args, **kwargs)


class NonFiniteStepError(RuntimeError):
    """A step's gradients held a NaN or an Inf and train.skip_nonfinite_steps allowed no more skips."""
