"""GPU probe: DSA forward+backward with the indexer loss on a second CUDA stream.

    python bench/probe_overlap.py --sizes 32768,131072 --out $OUT/overlap.json

The indexer KL (forward and backward) depends on the attention only through its lse and the
plan, and nothing of the attention depends on it. On its own stream, autograd runs its backward
there too, beside the attention backward, whose fp32 dK / dV reductions bound it. Times the
benchmark's forward+backward (bench_dsa.dsa_fwd_bwd) serial and with the loss on a side stream of
low / default / high priority, the pieces alone and two pieces at once, and the peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cli import require_gpus  # noqa: E402

from bench.bench_dsa import (D, TOPK, dsa_fwd_bwd, make_inputs, peak_mem,  # noqa: E402
                             timed)
from kernels.dsa import (build_sparse_plan, default_block_q, dsa_topk,  # noqa: E402
                         indexer_kl_loss, sparse_gqa_attention)
from kernels.dsa.indexer_loss import indexer_kl_bwd, indexer_kl_fwd  # noqa: E402
from kernels.dsa.sparse_attn import sparse_attn_bwd, sparse_attn_fwd  # noqa: E402

NAMES = ("q", "k", "v", "q_idx", "w", "k_idx")


def fwd_bwd_side(x, block_q, side):
    main = torch.cuda.current_stream()
    idx = dsa_topk(x["q_idx"], x["w"], x["k_idx"], TOPK)
    plan = build_sparse_plan(idx, block_q)
    o, lse = sparse_gqa_attention(x["q"], x["k"], x["v"], idx, return_lse=True, plan=plan)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        loss = indexer_kl_loss(x["q"], x["k"], x["q_idx"], x["w"], x["k_idx"], stage="sparse",
                               idx=idx, lse=lse, plan=plan)
        one = torch.ones_like(loss)
    grads = torch.autograd.grad([o, loss], [x[n] for n in NAMES], [x["do"], one])
    main.wait_stream(side)
    return grads


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32768,131072")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    require_gpus(__file__)
    res = []
    lo, hi = torch.cuda.Stream.priority_range()
    streams = {"low": torch.cuda.Stream(priority=lo), "high": torch.cuda.Stream(priority=hi)}
    for L in [int(s) for s in a.sizes.split(",")]:
        r = probe_size(L, streams)
        print(json.dumps(r, indent=1), flush=True)
        res.append(r)
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": res}, f, indent=1)


def probe_size(L, streams):
    x = make_inputs(L)
    bq = default_block_q(32, 4)
    r = {"L": L}
    # the overlapped path computes the same gradients
    g0 = dsa_fwd_bwd(x, bq)
    g1 = fwd_bwd_side(x, bq, streams["high"])
    torch.cuda.synchronize()
    r["rel_diff"] = {n: ((a_.float() - b_.float()).norm() / a_.float().norm()).item()
                         for n, a_, b_ in zip(NAMES, g0, g1)}
    del g0, g1
    r["serial_ms"] = timed(lambda: dsa_fwd_bwd(x, bq))
    for name, s in streams.items():
        r[f"side_{name}_ms"] = timed(lambda: fwd_bwd_side(x, bq, s))
    r["serial_again_ms"] = timed(lambda: dsa_fwd_bwd(x, bq))
    r["serial_peak"], _ = peak_mem(lambda: dsa_fwd_bwd(x, bq))
    r["side_high_peak"], _ = peak_mem(lambda: fwd_bwd_side(x, bq, streams["high"]))
    # kernel level: attention backward and loss backward, alone and at once
    qi, w, ki = (x[n].detach() for n in ("q_idx", "w", "k_idx"))
    q, k, v, do = (x[n].detach() for n in ("q", "k", "v", "do"))
    idx = dsa_topk(qi, w, ki, TOPK)
    plan = build_sparse_plan(idx, bq)
    scale = D ** -0.5
    o, lse = sparse_attn_fwd(q, k, v, plan, scale)
    kl, lse_i, z, psum = indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale, keep_psum=True)
    gscale = torch.full((1,), 1.0 / L, device=q.device)

    def attb():
        return sparse_attn_bwd(q, k, v, o, do, lse, plan, scale)

    def lossf():
        return indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale,
                              keep_psum=True)

    def lossb():
        return indexer_kl_bwd(qi, w, ki, q, k, lse, plan, scale,
                              lse_i, z, gscale, psum=psum)

    def both(s, first_side):
        m = torch.cuda.current_stream()
        s.wait_stream(m)
        if first_side:
            with torch.cuda.stream(s):
                b = (lossf(), lossb())
            a_ = attb()
        else:
            a_ = attb()
            with torch.cuda.stream(s):
                b = (lossf(), lossb())
        m.wait_stream(s)
        return a_, b

    r["attn_bwd_ms"] = timed(attb)
    r["loss_fwd_bwd_ms"] = timed(lambda: (lossf(), lossb()))
    for name, s in streams.items():
        for first_side in (True, False):
            r[f"attn_bwd+loss_{name}_{'side_first' if first_side else 'attn_first'}_ms"] = \
                timed(lambda: both(s, first_side))
    return r


if __name__ == "__main__":
    main()
