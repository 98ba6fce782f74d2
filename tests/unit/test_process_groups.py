"""Building the process groups again (another layout in the same process: the layouts driver, the benchmarks'
cases) frees the earlier layout's groups (parallel/groups.py _destroy_subgroups): megatron's
destroy_model_parallel only forgets them, and torch.distributed kept each with its descriptors, about 70 per
layout on gloo; and a group that a dropped trainer's reference cycles still hold keeps them until the cycles are
collected."""

import os

import torch.distributed as dist


def _descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Cycle:
    pass


def test_rebuilding_the_groups_holds_no_more_descriptors():
    from megatron.core import parallel_state

    from models.config import LMConfig
    from parallel.groups import build_process_groups, init_distributed
    from parallel.layout import ParallelConfig, ParallelLayout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(32000 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1")
    init_distributed()
    try:
        layout = ParallelLayout.build(ParallelConfig(), world_size=1, lm=LMConfig())
        counts = []
        for _ in range(4):
            pgs = build_process_groups(layout)
            counts.append(_descriptors())
            # a trainer holds its groups in reference cycles (its modules, hooks and config refer to each other):
            # dropped, they are freed only when the cycles are collected, which the next build must do
            held = _Cycle()
            held.groups, held.cycle = pgs, held
            del held
        assert counts[1] == counts[2] == counts[3], counts
        # the groups of the last build work
        assert pgs.tp.size() == 1 and dist.get_world_size(pgs.dp) == 1
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
