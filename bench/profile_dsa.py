"""GPU: where DSA forward+backward spends its time, kernel by kernel (torch.profiler).

    python bench/profile_dsa.py --sizes 32768,131072 --out $OUT/dsa_profile.json

bench_dsa.py's inputs and composition (top-k, union plan, sparse attention, sparse-stage indexer
KL, forward and backward). Per length: CUDA time per iteration of every kernel name, summed over
its launches and averaged over the profiled iterations, largest first. The kernels of one piece are
named after it (topk_fwd_kernel_*, plan_fwd_kernel_*, sparse_attn_*, indexer_loss_*); the rest is
PyTorch's own work (copies, fills, casts). A profile, not a benchmark: bench_dsa.py's do_bench
medians are the reported times; the profiler's per-kernel sum is close to them but adds its own
overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_dsa import HKV, HQ, dsa_fwd_bwd, make_inputs  # noqa: E402
from kernels.dsa import default_block_q  # noqa: E402


def profile_kernels(fn, iters):
    """{kernel name: CUDA ms per iteration} over `iters` calls of fn (after two warm-up calls)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per = defaultdict(float)
    calls = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] += ev.device_time_total / 1e3 / iters
            calls[ev.name] += 1
    rows = sorted(({"kernel": k, "ms": v, "launches": calls[k] // iters} for k, v in per.items()),
                  key=lambda r: -r["ms"])
    return rows


def profile_size(L, block_q, iters):
    x = make_inputs(L)
    return profile_kernels(lambda: dsa_fwd_bwd(x, block_q), iters)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32768,131072")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default="dsa_profile.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_dsa.py needs a CUDA GPU")
    block_q = default_block_q(HQ, HKV)
    res = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "sizes": []}
    for L in (int(s) for s in args.sizes.split(",")):
        rows = profile_size(L, block_q, args.iters)
        total = sum(r["ms"] for r in rows)
        res["sizes"].append({"L": L, "total_ms": total, "kernels": rows})
        print(f"\nL={L}: {total:.1f} ms of kernels per forward+backward")
        for r in rows:
            if r["ms"] >= 0.05:
                print(f"  {r['ms']:8.2f} ms  x{r['launches']:<5d} {r['kernel'][:100]}")
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
