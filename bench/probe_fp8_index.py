"""GPU probe: what fp8 index scores would give DSA's top-k selection and prefill (not a shipped path).

    python bench/probe_fp8_index.py --out $OUT/fp8_index.json     # L = 32K and 128K, 37 s on an H200

DeepSeek's lightning indexer scores in FP8; ours scores bf16 index queries and keys. This measures, on
bench_dsa.py's smooth inputs, what the fp8 design would change, in one run against the shipped bf16 path:

- the design measured: index keys in float8_e4m3fn with one power-of-two scale for the whole tensor (the
  model's index keys come out of a LayerNorm, so one scale serves every token), index queries in float8_e4m3fn
  with a power-of-two scale per (token, head) folded into that head's weight w (scores are sum_j w_j
  relu(q_j . k) and the scales are positive, so relu(s q8 . k8) = s relu(q8 . k8)). The scores are then the
  fp8 design's up to the one global key scale, which changes no order, so the shipped kernels (`dsa_topk`, and
  bench_dsa.py's `dsa_prefill`) run on the fp8 tensors unchanged (Triton's dot takes e4m3 operands on sm_90);
- time: the whole top-k (scores, threshold, compaction, selection) with bf16 and with fp8 inputs, and the
  prefill (top-k + union plan + sparse attention forward, no autograd) with each, against SDPA flash's
  forward (bench_dsa.py's prefill rows);
- selection: per query row with more than top-k eligible keys, the share of the bf16 selection that the fp8
  selection keeps (mean, the 1st percentile row, the worst row), and the rows that needed the exact fallback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cli import require_gpus  # noqa: E402

from bench.bench_dsa import HKV, HQ, TOPK, dense_prefill, dsa_prefill, make_inputs, timed  # noqa: E402
from kernels.dsa import default_block_q, dsa_topk  # noqa: E402

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two s with amax / s <= 448 (a power of two keeps the rescaling exact)."""
    return torch.exp2(torch.ceil(torch.log2(amax.clamp_min(1e-30) / FP8_MAX)))


def to_fp8(x: dict) -> dict:
    qi, ki, w = x["q_idx"].detach().float(), x["k_idx"].detach().float(), x["w"].detach().float()
    sq = pow2_scale(qi.abs().amax(dim=-1, keepdim=True))      # [1, L, HI, 1]
    sk = pow2_scale(ki.abs().amax())                           # one scale for all keys
    return dict(q_idx=(qi / sq).to(FP8), k_idx=(ki / sk).to(FP8), w=(w * sq.squeeze(-1)).contiguous())


def kept_share(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Per row, |a & b| / K of two [R, K] index sets (each row's entries distinct)."""
    out = []
    for r0 in range(0, a.shape[0], chunk):
        both = torch.cat([a[r0:r0 + chunk], b[r0:r0 + chunk]], dim=1).sort(dim=1).values
        out.append((both[:, 1:] == both[:, :-1]).sum(dim=1).float() / a.shape[1])
    return torch.cat(out)


def probe(L: int) -> dict:
    x = make_inputs(L)
    x8 = {**x, **to_fp8(x)}  # the same attention inputs, the fp8 indexer's
    block_q = default_block_q(HQ, HKV)
    res = {"L": L}
    stats_bf, stats_f8 = {}, {}
    idx_bf = dsa_topk(x["q_idx"], x["w"], x["k_idx"], TOPK, stats=stats_bf)
    idx_f8 = dsa_topk(x8["q_idx"], x8["w"], x8["k_idx"], TOPK, stats=stats_f8)
    rows = slice(TOPK, L)  # rows t >= TOPK have more than TOPK eligible keys; earlier rows take them all
    kept = kept_share(idx_bf[0, rows], idx_f8[0, rows])
    res["selection"] = dict(rows=L - TOPK, kept_mean=float(kept.mean()), kept_p01=float(kept.quantile(0.01)),
                            kept_min=float(kept.min()), fallback_rows_bf16=stats_bf.get("fallback_rows"),
                            fallback_rows_fp8=stats_f8.get("fallback_rows"))
    res["topk_ms"] = dict(bf16=timed(lambda: dsa_topk(x["q_idx"], x["w"], x["k_idx"], TOPK), quick=True),
                          fp8=timed(lambda: dsa_topk(x8["q_idx"], x8["w"], x8["k_idx"], TOPK), quick=True))
    res["prefill_ms"] = dict(bf16=timed(lambda: dsa_prefill(x, block_q), quick=True),  # bench_dsa.py's prefill
                             fp8=timed(lambda: dsa_prefill(x8, block_q), quick=True),
                             dense_flash=timed(lambda: dense_prefill(x), quick=True))
    p = res["prefill_ms"]
    res["prefill_over_dense"] = dict(bf16=p["bf16"] / p["dense_flash"], fp8=p["fp8"] / p["dense_flash"])
    res["topk_speedup_fp8"] = res["topk_ms"]["bf16"] / res["topk_ms"]["fp8"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="32768,131072")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    require_gpus(__file__)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for L in (int(s) for s in args.sizes.split(",")):
        try:
            results["runs"].append(probe(L))
        except Exception as e:  # recorded, and the next length still runs
            results["runs"].append({"L": L, "error": repr(e), "trace": traceback.format_exc()[-3000:]})
        print(json.dumps(results["runs"][-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
