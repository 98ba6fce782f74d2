"""What the non-finite step check costs a rank of the 30B recipe each step, on one GPU.

The check (train/nonfinite.py, Trainer._nonfinite) takes one norm per gradient buffer twice a step: before the
reduction over ranks (GradsBeforeReduction, which says where a NaN arose) and after it. A rank of `keye_30b_a3b`
(8 ranks, ep 8) holds a 19.24 GiB fp32 gradient buffer (launch/memory.py); this allocates buffers of the same
element counts (dense and expert, from parallel/memory.py) and times, against the same run's baselines:
  - "note": grad_norms + isfinite over the buffers, as GradsBeforeReduction does (the check runs it twice);
  - "adamw": the optimizer step the rank runs every step anyway, torch AdamW (foreach, as the trainer's) over this
    rank's shard of the distributed optimizer (fp32 master params, their gradients, two moments);
  - "read": one sum over the same buffers (a plain read of their bytes), and the machine's 4.2 TB/s.
Least of REPS calls after a warm-up, each synchronized.

    python3 bench/bench_nonfinite.py > $OUT/nonfinite.json        # one H200: about 60 GiB, a minute
    python3 bench/bench_nonfinite.py --scale 16384                # CPU: the same at 1/16384 of the sizes
"""
import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cli import require_gpus  # noqa: E402

from launch.memory import memory_inputs  # noqa: E402
from parallel.memory import model_state_bytes, trainable_counts  # noqa: E402
from train.nonfinite import grad_norms  # noqa: E402

REPS = 5
HBM_BYTES_PER_S = 4.2e12  # the H200's ceiling (../shared/DESIGN.md)


def counts(recipe: str) -> dict:
    """The recipe's per-rank trainable elements (dense, expert) and its optimizer shard's, as the memory estimate
    counts them (launch/memory.py's inputs, on the fewest ranks the recipe's layout needs)."""
    cfg, layout, m = memory_inputs([f"recipe={recipe}"])
    dense, expert = trainable_counts(m, rank=0)
    # the optimizer row holds 12 bytes per element of the shard in bf16 training: fp32 master copy, Adam m and v
    shard = model_state_bytes(m, rank=0)["optimizer (master + Adam, sharded)"] / 12
    return {"recipe": recipe, "layout": layout.describe(), "dense": int(dense), "expert": int(expert),
            "shard": int(shard)}


def timed(fn, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(REPS):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="keye_30b_a3b")
    ap.add_argument("--scale", type=int, default=1, help="divide every size by this (a CPU check of the script)")
    a = ap.parse_args()
    if a.scale == 1:
        require_gpus(__file__, hint="at full size it holds about 60 GiB; --scale 16384 checks the script on the CPU")
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    c = counts(a.recipe)
    n_dense, n_expert, n_shard = (max(1, c[k] // a.scale) for k in ("dense", "expert", "shard"))
    # megatron's DDP chunk as grad_norms reads it: a dense buffer and an expert-parallel buffer of fp32 gradients
    bufs = [torch.empty(n, device=dev).normal_(0, 1e-3) for n in (n_dense, n_expert)]
    chunk = SimpleNamespace(buffers=[SimpleNamespace(grad_data=bufs[0])],
                            expert_parallel_buffers=[SimpleNamespace(grad_data=bufs[1])])
    grad_bytes = 4 * (n_dense + n_expert)

    def note():
        return torch.isfinite(torch.stack(grad_norms([chunk]))).all()

    note_s = timed(note, sync)
    read_s = timed(lambda: [b.sum() for b in bufs], sync)
    finite = bool(note())
    bufs[1][n_expert // 2] = float("nan")
    caught = not bool(note())  # the same call sees a NaN in the expert buffer
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    master = torch.nn.Parameter(torch.empty(n_shard, device=dev).normal_(0, 0.02))
    master.grad = torch.empty_like(master).normal_(0, 1e-3)
    opt = torch.optim.AdamW([master], lr=1e-5, foreach=True)
    adamw_s = timed(opt.step, sync)
    res = {**c, "scale": a.scale, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "grad_gib": grad_bytes / 2 ** 30, "shard_params": n_shard,
           "note_ms": note_s * 1e3, "check_ms": 2 * note_s * 1e3, "read_ms": read_s * 1e3,
           "adamw_ms": adamw_s * 1e3, "check_over_adamw": 2 * note_s / adamw_s,
           "note_tb_s": grad_bytes / note_s / 1e12, "read_tb_s": grad_bytes / read_s / 1e12,
           "note_of_ceiling": grad_bytes / note_s / HBM_BYTES_PER_S, "finite_seen": finite, "nan_seen": caught}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
