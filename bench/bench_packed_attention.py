"""GPU: dense causal GQA attention on packed documents, per-document SDPA calls against one varlen call.

    python bench/bench_packed_attention.py --out $OUT/packed_attention.json

`models/attention/dense` attends a packed row (cu_seqlens) either document by document, one
`scaled_dot_product_attention` call each (`per_document_attention`: the row split into documents, outputs
concatenated), or in one call of torch's `torch.nn.attention.varlen.varlen_attn` (FlashAttention over
cumulative sequence bounds). For packed rows of equal documents at the language model's attention shapes
(32 q / 4 kv heads, head dim 128, bf16) this times the forward+backward of both, of `causal_attention`
(which picks one by the documents' mean length, VARLEN_BELOW_MEAN_DOC), and of the loop as it was before
(each document sliced out of the row, SDPA's output gradient handed on as a slice), in the same run, and
checks that they agree (relative RMSE of the output and of dq, dk, dv against the slice loop). It records the varlen signature of the installed torch (its causal argument changed across
versions).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cli import require_gpus  # noqa: E402

from triton.testing import do_bench  # noqa: E402

from models.attention import dense  # noqa: E402
from models.attention.dense import causal_attention, per_document_attention  # noqa: E402

HQ, HKV, D = 32, 4, 128
CASES = [(8192, 2048), (32768, 256), (32768, 512), (32768, 1024), (32768, 2048), (32768, 4096), (32768, 8192),
         (131072, 512), (131072, 2048), (131072, 8192)]


def slice_loop(q, k, v, cu_seqlens, scale):
    """The per-document loop as it was before the split: each document sliced out of the row, written into
    a preallocated output (kept here as the baseline it was measured against)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        out[:, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True, scale=scale,
            enable_gqa=True)
    return out


def rel(ref, x):
    ref, x = ref.double(), x.double()
    return ((ref - x).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="packed_attention.json")
    args = ap.parse_args()
    require_gpus(__file__)
    from torch.nn.attention import varlen
    sig = str(inspect.signature(varlen.varlen_attn))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "varlen_signature": sig,
           "varlen_used": dense._varlen() is not None, "rows": []}
    print(res, flush=True)
    scale = D ** -0.5
    for L, doc in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, HQ, L, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
        k = torch.randn(1, HKV, L, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
        v = torch.randn(1, HKV, L, D, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_(True)
        do = torch.randn(1, HQ, L, D, device="cuda", generator=g, dtype=torch.bfloat16)
        cu = torch.arange(0, L + 1, doc, dtype=torch.int32, device="cuda")
        impls = {
            "slice loop (before)": lambda: slice_loop(q, k, v, cu, scale),
            "per-document SDPA": lambda: per_document_attention(q, k, v, cu, scale),
            "varlen": lambda: dense._varlen_causal(q, k, v, cu, scale, doc),
            "causal_attention": lambda: causal_attention(q, k, v, cu, scale, max_seqlen=doc),  # picks one
        }
        row = {"L": L, "doc": doc}
        outs = {}
        for name, fn in impls.items():
            try:
                q.grad = k.grad = v.grad = None
                o = fn()
                o.backward(do)
                outs[name] = [o.detach(), q.grad, k.grad, v.grad]

                def fb(fn=fn):
                    q.grad = k.grad = v.grad = None
                    fn().backward(do)
                row[name] = {"fwd_ms": do_bench(fn, warmup=10, rep=50, return_mode="median"),
                             "fwd_bwd_ms": do_bench(fb, warmup=10, rep=50, return_mode="median")}
            except Exception as e:  # recorded, the run goes on
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        if len(outs) == len(impls):  # against the slice loop (the split loop makes the same SDPA calls)
            a = outs["slice loop (before)"]
            row["rel_rmse"] = {name: {n: rel(x, y) for n, x, y in zip(("o", "dq", "dk", "dv"), a, outs[name])}
                               for name in list(impls)[1:]}
            row["causal_attention_speedup_vs_before"] = (row["slice loop (before)"]["fwd_bwd_ms"]
                                                         / row["causal_attention"]["fwd_bwd_ms"])
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        q = k = v = do = outs = None
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
