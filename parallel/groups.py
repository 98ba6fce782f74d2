"""Process-group construction through megatron-core, on NCCL with GPUs or gloo on the CPU.

`init_distributed` starts torch.distributed from the torchrun environment (a single process without
one); `build_process_groups` builds megatron's groups for a validated layout and returns them as a
`ProcessGroupCollection`, which is what models and the trainer receive: nothing below this reads
megatron's global parallel state on its own.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from parallel.cpu_mode import enable_cpu_mode
from parallel.layout import ParallelLayout
from parallel.megatron_compat import apply_megatron_fixes

log = logging.getLogger(__name__)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_minutes: int = 30) -> torch.device:
    """Initialises torch.distributed; returns the device this rank computes on."""
    apply_megatron_fixes()
    if not torch.cuda.is_available():
        enable_cpu_mode()
        backend, device = "gloo", torch.device("cpu")
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def build_process_groups(layout: ParallelLayout) -> ProcessGroupCollection:
    if dist.get_world_size() != layout.world_size:
        raise ValueError(f"layout was validated for world size {layout.world_size}, "
                         f"torch.distributed has {dist.get_world_size()}")
    _destroy_subgroups()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        order="tp-cp-ep-dp-pp",
    )
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    log.info("parallel layout: %s", layout.describe())
    return pgs


def _destroy_subgroups() -> None:
    """Destroys every process group but the default one: an earlier layout's, when a process builds several
    (the layouts driver, the benchmarks' cases). megatron's destroy_model_parallel only forgets its groups, which
    torch.distributed keeps, each with its sockets, pipes and event descriptors: about 70 descriptors per layout on
    gloo (tests/unit/test_process_groups.py), past 1,024 after some 15 layouts."""
    from torch.distributed import distributed_c10d as c10d

    groups = [pg for pg in c10d._world.pg_map if pg is not c10d.GroupMember.WORLD]
    for pg in groups:
        dist.destroy_process_group(pg)
    # A destroyed group's descriptors close when the group object is freed. A dropped trainer still holds its groups
    # in reference cycles (its modules, hooks and config refer to each other), which only the cyclic collector frees:
    # without this, measured, 65 more descriptors stayed open per trainer built in one process. Nothing destroyed
    # (a process's first layout): no collection, a full one costs ~0.25 s with torch and megatron-core loaded.
    if groups:
        gc.collect()


def rank_grid(layout: ParallelLayout) -> torch.Tensor:
    """The dense-side rank grid as one readable view: grid[pp, dp, cp, tp] = global rank."""
    return torch.arange(layout.world_size).view(layout.pp, layout.dp, layout.cp, layout.tp)


def sequence_group(layout: ParallelLayout, pgs: ProcessGroupCollection):
    """The ranks that share one LM sequence: TP x CP x PP of this data-parallel replica. Megatron's
    model-parallel group when CP is off; with CP a group of its own (megatron 0.16.1 has none), made on
    every rank for every replica in the same order, as torch.distributed requires. The vision tower
    encodes a replica's frames over this group (train/vision.py)."""
    if layout.cp == 1:
        return pgs.mp
    grid = rank_grid(layout)
    mine = None
    for d in range(layout.dp):
        ranks = grid[:, d].flatten().tolist()
        g = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = g
    return mine


def teardown(*, barrier: bool = True) -> None:
    """Destroys the process groups. `barrier=False` after this rank failed: the other ranks may be inside a
    collective this rank left (an error raised mid-step on one rank, such as a DataLoader worker's death), so a
    barrier would wait for them until the process group's timeout (30 minutes) with nothing on stderr. Without it
    the rank exits at once and torchrun stops the others."""
    if dist.is_initialized():
        # A barrier before destroying the group: without it some ranks aborted at exit.
        if barrier:
            dist.barrier()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def seed_all(seed: int, pgs: ProcessGroupCollection) -> None:
    """Seeds python, torch and megatron's per-parallel-group RNG streams (tensor / expert parallel)."""
    import random

    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, tp_rank=pgs.tp.rank(), ep_rank=pgs.ep.rank(),
                                    etp_rank=pgs.expt_tp.rank())
