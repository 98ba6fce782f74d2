"""GPU: DSA's sparse stage on packed documents no longer than top-k: the layer's dense path against the
sparse kernels, on the same inputs, in the same run.

    python bench/bench_dsa_short.py --out $OUT/dsa_short.json

When no document of a micro-batch is longer than top-k, every token's selection is its whole causal
prefix, so `models/attention/dsa.py`'s DSACoreAttention runs dense attention (`causal_attention`) and the
dense indexer KL instead of top-k + union plan + sparse attention + sparse KL; the result is the same
(tests/unit/test_dsa_core_attention.py). This times the layer's forward+backward both ways: "dense path"
as the layer runs it, "sparse path" with the layer told that a document is longer than top-k (the code it
ran before the change). Shapes are bench_dsa.py's (B = 1, 32 q / 4 kv heads, d 128, indexer 16 x 64, top-k
2048, bf16, smooth indexer inputs), packed into equal documents. Also checks that both paths give the same
output and KL (relative RMSE) and records the peak memory of each.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cli import require_gpus  # noqa: E402

from bench.bench_dsa import HKV, HQ, TOPK, D, make_inputs, peak_mem, rel, timed  # noqa: E402

CASES = [(8192, 2048), (32768, 2048), (32768, 512), (131072, 2048)]  # (tokens, document length)


def make_core():
    from megatron.core.transformer import TransformerConfig

    import models.attention.dsa as mdsa
    cfg = TransformerConfig(num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV,
                            kv_channels=D, params_dtype=torch.bfloat16, bf16=True)
    return mdsa, mdsa.DSACoreAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self",
                                       topk=TOPK, stage="sparse", backend="triton").train()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="dsa_short.json")
    args = ap.parse_args()
    require_gpus(__file__)
    from megatron.core.packed_seq_params import PackedSeqParams
    mdsa, core = make_core()
    real_longest = mdsa.longest_document
    rows = []
    for L, doc in CASES:
        x = make_inputs(L)
        cu = torch.arange(0, L + 1, doc, dtype=torch.int32, device="cuda")
        packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=doc,
                                 max_seqlen_kv=doc)
        q, k, v = (x[n].transpose(0, 1) for n in ("q", "k", "v"))   # megatron's [s, b, h, d]
        dout = x["do"].transpose(0, 1).reshape(L, 1, HQ * D)

        def fwd():
            core.indexer_out = (x["q_idx"], x["w"], x["k_idx"])
            return core(q, k, v, None, packed_seq_params=packed)

        def fwd_bwd():
            for t in x.values():
                t.grad = None
            fwd().backward(dout)

        def use(path):
            # the sparse path: the layer believes a document is longer than top-k, as before the change
            mdsa.longest_document = real_longest if path == "dense path" else (lambda s, p: s)

        row = {"L": L, "doc": doc}
        for path in ("dense path", "sparse path"):
            use(path)
            try:
                row[path] = {"fwd_bwd_ms": timed(fwd_bwd), "peak_gib": peak_mem(fwd_bwd)[0] / 2**30}
            except Exception as e:  # recorded, the run goes on
                row[path] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        outs = {}
        with torch.no_grad():  # outputs and KL of both paths, after the timings (no AttachLoss here)
            for path in ("dense path", "sparse path"):
                use(path)
                if "error" not in row[path]:
                    outs[path] = fwd()
                    row[path]["kl"] = float(core.last_kl)
        mdsa.longest_document = real_longest
        if len(outs) == 2:
            d, s = row["dense path"], row["sparse path"]
            row["out_rel_rmse"] = rel(outs["sparse path"], outs["dense path"])
            row["kl_rel"] = abs(d["kl"] - s["kl"]) / abs(s["kl"])
            row["speedup"] = s["fwd_bwd_ms"] / d["fwd_bwd_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        x = outs = q = k = v = dout = None
        torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(), "topk": TOPK, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'L':>7} {'doc':>5} | {'dense path ms':>13} {'sparse path ms':>14} {'speed-up':>8} | "
          f"{'GiB dense':>9} {'GiB sparse':>10} | out rel  kl rel")
    for r in rows:
        d, s = r["dense path"], r["sparse path"]
        if "speedup" in r:
            print(f"{r['L']:>7} {r['doc']:>5} | {d['fwd_bwd_ms']:13.2f} {s['fwd_bwd_ms']:14.2f} {r['speedup']:7.2f}x | "
                  f"{d['peak_gib']:9.2f} {s['peak_gib']:10.2f} | {r['out_rel_rmse']:.1e} {r['kl_rel']:.1e}")
        else:
            print(r)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
