"""Fault injection points a user (or a test) can switch on, to check that failures lose nothing.

    KEYE_FAULT="kill_in_save:step=4"          a rank dies (SIGKILL) after writing its shards of the
                                              step-4 checkpoint, before the commit
    KEYE_FAULT="kill_in_step:step=3:rank=1"   rank 1 dies (SIGKILL) in the middle of step 3
    KEYE_FAULT="nan_in_step:step=3:rank=1"    rank 1's loss in step 3 is NaN (so are the gradients it reaches); in
                                              the DSA warm-up (forward only) its indexers' inputs. `micro=K`: in
                                              the rank's micro-batch K of the step alone (0-based); `doc=J`: in
                                              its document J alone (a packed row's; a row of a micro-batch of rows
                                              without document bounds), on the last pipeline stage
    KEYE_FAULT="nan_backward_in_step:step=3:rank=1"  rank 1's own gradients in step 3 are NaN before their reduction
                                              over ranks, its loss finite (a backward that overflowed)
    KEYE_FAULT="nan_grad_in_step:step=3:rank=1"  rank 1's own gradients in step 3 are NaN after their reduction
                                              over ranks (the other ranks' stay finite)
    KEYE_FAULT="spike_grad_in_step:step=3"    the language model's gradients in step 3 are 1000 times what they were,
                                              after their reduction over ranks (a bad batch's gradient spike: every
                                              rank's, unless `rank` names one)
    KEYE_FAULT="spike_backward_in_step:step=3:rank=1"  rank 1's own gradients in step 3 are 1000 times what they
                                              were before their reduction over ranks (one rank's bad data: a spiking
                                              step's suspects name that rank first)
    KEYE_FAULT="data_end_in_step:step=3:rank=1"  rank 1's video data ends in step 3 (the other ranks' goes on)
Several faults are separated by ';'. `rank` defaults to every rank, `step` to every step.
The disk-full case needs no hook: run with the run directory on a small filesystem
(tests/dist/test_faults.py mounts a tmpfs).
"""

from __future__ import annotations

import contextlib
import os
import signal

import torch


FAULTS = ("kill_in_save", "kill_in_step", "nan_in_step", "nan_backward_in_step", "nan_grad_in_step",
          "spike_grad_in_step", "spike_backward_in_step", "data_end_in_step")
ARGUMENTS = ("step", "rank", "micro", "doc")


def _parse(spec: str) -> list[tuple[str, dict]]:
    """[(fault, {argument: int})] of a KEYE_FAULT value; ValueError naming the part that is not a fault of FAULTS
    with `:name=integer` arguments of ARGUMENTS (a misspelled drill would otherwise pass without its fault)."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        name, *args = item.split(":")
        kv = {}
        for a in args:
            k, eq, v = a.partition("=")
            if not (eq and k in ARGUMENTS and v.strip().lstrip("-").isdigit()):
                raise ValueError(f"KEYE_FAULT={spec!r}: {a!r} in {item!r} is not NAME=INTEGER with NAME one of "
                                 f"{', '.join(ARGUMENTS)}")
            kv[k] = int(v)
        if name not in FAULTS:
            raise ValueError(f"KEYE_FAULT={spec!r}: {name!r} is not a fault; the faults are {', '.join(FAULTS)} "
                             f"(train/faults.py)")
        faults.append((name, kv))
    return faults


def check_env() -> None:
    """ValueError naming KEYE_FAULT when it is set and not a list of faults: the launcher checks it before a run."""
    spec = os.environ.get("KEYE_FAULT")
    if spec:
        _parse(spec)


def planned(point: str) -> bool:
    """Whether KEYE_FAULT names `point` at all (for any step or rank)."""
    spec = os.environ.get("KEYE_FAULT")
    return any(name == point for name, _ in (_parse(spec) if spec else []))


def requested(point: str, *, step: int, rank: int) -> bool:
    """Whether KEYE_FAULT names `point` for this step and rank."""
    return fault_args(point, step=step, rank=rank) is not None


def fault_args(point: str, *, step: int, rank: int) -> dict | None:
    """The arguments of the fault KEYE_FAULT names at `point` for this step and rank, or None."""
    spec = os.environ.get("KEYE_FAULT")
    for name, kv in _parse(spec) if spec else []:
        if name == point and kv.get("step", step) == step and kv.get("rank", rank) == rank:
            return kv
    return None


def maybe_fail(point: str, *, step: int, rank: int) -> None:
    """Kills this process with SIGKILL if KEYE_FAULT names `point` for this step and rank."""
    if requested(point, step=step, rank=rank):
        os.kill(os.getpid(), signal.SIGKILL)


def _micro_batch_hits(micro_batch: int | None):
    """Whether a call is in the poisoned micro-batch: every call, or each caller's call of that index (0-based;
    a caller, a model chunk or a layer, runs once per micro-batch)."""
    calls: dict[int, int] = {}

    def hit(caller) -> bool:
        i = calls[id(caller)] = calls.get(id(caller), -1) + 1
        return micro_batch is None or i == micro_batch
    return hit


def poisoned_loss(forward_step, micro_batch: int | None = None, part: int | None = None):
    """The forward step with a NaN loss (nan_in_step): in every micro-batch, or in the one of that index among those
    the schedule runs (counted per model chunk); with `part` the loss of that part's tokens alone (a packed row's
    document, or a row: train/nonfinite.py part_ids), where the stage's output is the loss per token (the last
    pipeline stage's). A product, so that the gradients it reaches are NaN too."""
    hit = _micro_batch_hits(micro_batch)

    def step(data_iterator, model):
        output, loss_func = forward_step(data_iterator, model)
        if not hit(model):
            return output, loss_func
        parts = getattr(loss_func, "keywords", {}).get("parts")
        if part is None or parts is None or parts.shape != output.shape:
            return output * float("nan"), loss_func
        return output * torch.where(parts == part, float("nan"), 1.0), loss_func
    return step


@contextlib.contextmanager
def poisoned_indexers(chunks, micro_batch: int | None = None):
    """nan_in_step in the DSA warm-up, whose schedule runs forward only (each layer's indexer KL back-propagates in
    its forward, so a NaN loss at the end would reach nothing): every DSA indexer's input is NaN, in every
    micro-batch or in the one of that index (counted per indexer), and so are the KLs and the indexers'
    gradients."""
    from models.attention.dsa import DSAIndexer

    hit = _micro_batch_hits(micro_batch)

    def poison(mod, args):
        return (args[0] * float("nan"), *args[1:]) if hit(mod) else None

    hooks = [m.register_forward_pre_hook(poison) for c in chunks for m in c.modules() if isinstance(m, DSAIndexer)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def scale_gradients(model: list, factor: float = 1000.0) -> None:
    """spike_grad_in_step, spike_backward_in_step: every gradient buffer of the language model's DDP chunks times
    `factor`."""
    for m in model:
        for buf in (*m.buffers, *m.expert_parallel_buffers):
            buf.grad_data.mul_(factor)


def poison_gradients(model: list) -> None:
    """nan_grad_in_step / nan_backward_in_step: the first gradient buffer of the first DDP chunk is NaN."""
    model[0].buffers[0].grad_data.fill_(float("nan"))
