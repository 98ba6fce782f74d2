"""What the vision phase's meeting before the pixel exchange costs (parallel/vit_layout.py raise_together, under
parallel.vit.decode_once), against the exchange it guards, on CPU: W gloo processes, each round the meeting (one
all_reduce of one int32 and its host read) and then the pixel all_to_all of a round (the decoding rank sends each rank
its share of F frames of P patches, uint8 3 x 14 x 14 per patch), timed apart over R rounds after a warm-up; the
median of each, and the meeting's share of the two.

    python bench/bench_vision_meeting.py [--world 2] [--rounds 200] [--frames 16] [--patches 256] [--out f.json]

A CPU and gloo measure (the machine the tests run on); on GPUs the meeting is one small NCCL all_reduce and a
host read, not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rank(rank: int, world: int, port: int, a: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist

    from parallel.vit_layout import raise_together

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = a.frames * a.patches
    share = [rows // world + (r < rows % world) for r in range(world)]     # the plan's shares, evened
    x = torch.randint(0, 255, (rows if rank == 0 else 0, 3 * 14 * 14), dtype=torch.uint8)
    meet, move = [], []
    for i in range(a.rounds + 20):
        dist.barrier()
        t0 = time.perf_counter()
        raise_together(None, None, torch.device("cpu"))
        t1 = time.perf_counter()
        got = x.new_empty((share[rank], x.shape[1]))
        dist.all_to_all_single(got, x, output_split_sizes=[share[rank] if r == 0 else 0 for r in range(world)],
                               input_split_sizes=share if rank == 0 else [0] * world)
        t2 = time.perf_counter()
        if i >= 20:
            meet.append(t1 - t0)
            move.append(t2 - t1)
    if rank == 0:
        m, p = statistics.median(meet) * 1e3, statistics.median(move) * 1e3
        res = {"world": world, "rounds": a.rounds, "frames": a.frames, "patches": a.patches,
               "pixel_bytes": rows * 3 * 14 * 14, "meeting_ms": m, "exchange_ms": p, "meeting_share": m / (m + p)}
        Path(out).write_text(json.dumps(res, indent=1))
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    from launch.supervise import free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--patches", type=int, default=256)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    out = a.out or str(Path(os.environ.get("TMPDIR", "/tmp")) / "vision_meeting.json")
    mp.start_processes(_rank, args=(a.world, free_port(), a, out), nprocs=a.world, start_method="spawn")
    res = json.loads(Path(out).read_text())
    print(f"{a.world} gloo processes, {res['pixel_bytes'] / 2**20:.1f} MiB of pixels a round: meeting "
          f"{res['meeting_ms']:.3f} ms, pixel exchange {res['exchange_ms']:.3f} ms (median of {a.rounds} rounds); "
          f"the meeting is {100 * res['meeting_share']:.1f}% of the two")


if __name__ == "__main__":
    main()
