"""How the fused backward (kernels/dsa/fused.py) should take the KL's target from the attention backward, one H200.

    python bench/probe_fused_psum.py --out $OUT/fused_psum.json       # L = 32K and 128K

Per length, on bench_dsa.py's inputs (smooth indexer inputs, Keye's shapes, bf16), each timed with
triton.testing.do_bench (median) in the same run:
  split          attention backward alone + the split loss's forward (per-group psum kernels + KL) + its backward
  attn_bwd       the attention backward alone (what the fused variants add to)
  atomic/sum     the attention backward adds each group's head-summed P into one fp32 buffer (atomics)
  atomic/dot     the same, the head sum taken as a [keys, rows] x [rows, 16] indicator product
  store/sum      each group stores its head-summed P into a slice of its own (no atomics); the KL kernels
                 sum the slices in group order (deterministic)
  store/dot      the same with the indicator product
each fused variant including its KL forward and backward kernels, all at 256 MiB chunks of fp32 P.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_dsa import D, TOPK, make_inputs, timed  # noqa: E402
from kernels.dsa import build_sparse_plan, default_block_q, dsa_topk  # noqa: E402
from kernels.dsa.fused import attention_kl_bwd  # noqa: E402
from kernels.dsa.indexer_loss import indexer_kl_bwd, indexer_kl_fwd  # noqa: E402
from kernels.dsa.sparse_attn import sparse_attn_bwd, sparse_attn_fwd  # noqa: E402

VARIANTS = {"atomic/sum": (1, False), "atomic/dot": (1, True), "store/sum": (2, False), "store/dot": (2, True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fused_psum.json")
    ap.add_argument("--sizes", default="32768,131072")
    args = ap.parse_args()
    res = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(), "sizes": []}
    for L in (int(s) for s in args.sizes.split(",")):
        x = make_inputs(L)
        qi, w, ki, q, k, v, do = (x[n].detach() for n in ("q_idx", "w", "k_idx", "q", "k", "v", "do"))
        plan = build_sparse_plan(dsa_topk(qi, w, ki, TOPK), default_block_q(q.shape[2], k.shape[2]))
        scale = D ** -0.5
        o, lse = sparse_attn_fwd(q, k, v, plan, scale)
        g = torch.full((1,), 1.0 / L, device=q.device)
        kl, lse_i, z, psum = indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale, keep_psum=True)
        ref = sparse_attn_bwd(q, k, v, o, do, lse, plan, scale) + indexer_kl_bwd(
            qi, w, ki, q, k, lse, plan, scale, lse_i, z, g, psum=psum)
        r = {"L": L}

        def split():
            sparse_attn_bwd(q, k, v, o, do, lse, plan, scale)
            _, li, zz, ps = indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale, keep_psum=True)
            return indexer_kl_bwd(qi, w, ki, q, k, lse, plan, scale, li, zz, g, psum=ps)

        r["split_ms"] = timed(split)
        r["attn_bwd_ms"] = timed(lambda: sparse_attn_bwd(q, k, v, o, do, lse, plan, scale))
        for name, (mode, dot) in VARIANTS.items():
            fn = (lambda mode=mode, dot=dot: attention_kl_bwd(q, k, v, o, do, lse, qi, w, ki, plan, scale, g,
                                                              psum_mode=mode, psum_dot=dot))
            got = fn()
            rel = {n: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))
                   for n, a, b in zip(("dq", "dk", "dv", "dq_idx", "dw", "dk_idx"), got[:6], ref)}
            rel["kl"] = float((got[6] - kl).norm() / kl.norm())
            r[name] = {"ms": timed(fn), "rel_to_split": rel}
            print(f"L={L} {name}: {r[name]['ms']:.2f} ms (split {r['split_ms']:.2f}, attn_bwd {r['attn_bwd_ms']:.2f}); "
                  f"rel {', '.join(f'{n} {e:.1e}' for n, e in rel.items())}", flush=True)
        res["sizes"].append(r)
        x = plan = o = lse = psum = ref = None  # free this length's tensors before the next
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
