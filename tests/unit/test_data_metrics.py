"""The loader metrics a step logs, over the ranks (train/metrics.data_metrics_table, summed over the world by
sum_over_world beside another step metric, then data_metrics_from_table, as the trainer does), against the plain
max / sum of what each rank passed in. Four gloo processes stand in for a job with two data-parallel groups
(ranks {0, 2} and {1, 3}, as with context parallelism 2): the wait is the longest of any rank, named by its
rank (the lowest of equal ones); the failures, and a mixture's packs and tokens per source from which the shares
are taken, and the image / text-only samples, the video and fast frames (as the fast share) and the continued texts
served, are summed within the caller's data-parallel group only (their keys appear on every rank once any rank has
served such a sample)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.launch_util import free_port
from train.metrics import data_metrics_from_table, data_metrics_table, sum_over_world

WAIT = [0.1, 0.7, 0.7, 0.2]          # ranks 1 and 2 wait equally long: rank 1 is named
FAILED = [1, 2, 5, 7]
IMAGES = [0, 4, 0, 0]                # only rank 1 has served images: every rank reports them, group sums
TEXTS = [0, 0, 0, 0]                 # none anywhere: no rank reports the key
FRAMES = [40, 10, 20, 0]             # video frames, and of them fast (slow and fast frames) ...
FAST = [30, 0, 5, 0]                 # ... only in group {0, 2}: every rank reports the share, group {1, 3} 0
CONTINUED = [0, 0, 0, 2]             # texts continued over sequences: rank 3 only
DECODED = [24, 0, 0, 0]              # frames decoded (parallel.vit.decode_once: the replica's first rank alone) ...
DECODE_S = [1.5, 0.0, 0.0, 0.0]      # ... and its seconds: summed over the whole world, not a group
GROUPS = [[0, 2], [1, 3]]
PACKS = {"long": [1, 3, 0, 2], "short": [3, 1, 4, 6]}       # per rank, since the run began
TOKENS = {"long": [900, 2700, 0, 1800], "short": [300, 100, 4000, 600]}


def _worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        groups = [dist.new_group(g) for g in GROUPS]
        mine = groups[rank % 2]
        local = {"data_wait_s": WAIT[rank], "data_samples_failed": FAILED[rank], "data_long_seq_share": 0.5 + rank}
        if IMAGES[rank]:
            local["data_samples_image"] = IMAGES[rank]
        for key, values in (("data_frames_video", FRAMES), ("data_frames_fast", FAST),
                            ("data_texts_continued", CONTINUED), ("data_frames_decoded", DECODED),
                            ("data_decode_s", DECODE_S)):
            if values[rank]:   # as VideoBatchStream.step_metrics: only once served
                local[key] = values[rank]
        sources = {n: {"packs": PACKS[n][rank], "tokens": TOKENS[n][rank], "samples": 99} for n in PACKS}
        cpu = torch.device("cpu")
        # another step metric summed in the same all-reduce, before the table: its slice is its own world sum
        other = torch.tensor([float(rank), 1.0, 2.0 ** 40 + rank], dtype=torch.float64)  # exact in float64
        summed, table = sum_over_world([other, data_metrics_table(local, device=cpu, sources=sources)], cpu)
        assert summed.tolist() == [sum(range(world)), world, world * 2.0 ** 40 + sum(range(world))]
        out[rank] = data_metrics_from_table(local, table, dp_group=mine, sources=sources)
    finally:
        dist.destroy_process_group()


def test_wait_is_the_slowest_rank_failures_and_shares_over_the_replicas():
    world = len(WAIT)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), out), nprocs=world, join=True)
        got = dict(out)
    for rank in range(world):
        group = GROUPS[rank % 2]
        assert got[rank]["data_wait_s"] == max(WAIT)
        assert got[rank]["data_wait_rank"] == WAIT.index(max(WAIT)) == 1
        assert got[rank]["data_samples_failed"] == sum(FAILED[r] for r in group)
        assert got[rank]["data_samples_image"] == sum(IMAGES[r] for r in group)     # 0 in group {0, 2}
        assert "data_samples_text" not in got[rank]
        assert got[rank]["data_fast_frame_share"] == sum(FAST[r] for r in group) / max(sum(FRAMES[r] for r in group), 1)
        assert got[rank]["data_texts_continued"] == sum(CONTINUED[r] for r in group)
        assert "data_frames_video" not in got[rank] and "data_frames_fast" not in got[rank]
        assert got[rank]["data_frames_decoded"] == sum(DECODED) and got[rank]["data_decode_s"] == sum(DECODE_S)
        for n in PACKS:
            packs = {m: sum(PACKS[m][r] for r in group) for m in PACKS}
            tokens = {m: sum(TOKENS[m][r] for r in group) for m in TOKENS}
            assert got[rank][f"data_{n}_seq_share"] == packs[n] / sum(packs.values())
            assert got[rank][f"data_{n}_token_share"] == tokens[n] / sum(tokens.values())


def test_without_a_process_group_the_rank_metrics_pass_through():
    assert not dist.is_initialized()
    local = {"data_wait_s": 0.25, "data_samples_failed": 3}
    table = data_metrics_table(local, device=torch.device("cpu"))
    assert data_metrics_from_table(local, table, dp_group=None) == local
    slow_fast = {**local, "data_frames_video": 8, "data_frames_fast": 6}
    assert data_metrics_from_table(slow_fast, table, dp_group=None) == {**local, "data_fast_frame_share": 0.75}
