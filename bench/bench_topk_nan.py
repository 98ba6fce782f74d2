"""GPU check and timing of the DSA top-k's NaN ranking (kernels/dsa/topk.py: a NaN index score ranks as -inf),
against the selection code before it, in the same run. One H200 (or H100).

    git show 89bf700^:kernels/dsa/topk.py > bench/_topk_before.py    # the code before, beside this file
    python bench/bench_topk_nan.py --before bench/_topk_before.py --out $OUT/topk_nan.json

1. Correctness on the compiled kernels: integer-valued indexer inputs (exact fp32 scores) with NaNs in some query
   rows, weights and keys, at T = 4,096 in 3 documents: the selection equals naive.rank_topk's, both selection
   paths (stored, fused); every position lies in its row's document, none uninitialised.
2. Timing, B = 1, index 16 x 64, top-k 2048, bf16: bench/bench_dsa.py's smooth indexer inputs (its make_inputs),
   L = 32K and 128K: dsa_topk now against the code before it (`--before`), alternating, the median of
   triton.testing.do_bench's runs; the ratio is the change's cost (the candidate passes' NaN select, the samples'
   NaN mask). The kernels' source differs only there.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from triton.testing import do_bench  # noqa: E402

from bench_dsa import TOPK, make_inputs  # noqa: E402
from kernels.dsa import naive, topk as now  # noqa: E402
from kernels.dsa.common import row_doc_start  # noqa: E402

def load_before(path: str):
    """The top-k module before the change, as a module of the kernels.dsa package (its relative imports)."""
    spec = importlib.util.spec_from_file_location("kernels.dsa._topk_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def correctness(dev, T: int = 4096, K: int = 64, nan: bool = True) -> dict:
    """The selection against naive.rank_topk on integer inputs (exact fp32 scores), with NaNs (or, nan=False, the
    same inputs without them: ties alone), both paths; on a mismatch, the first rows that differ."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randint(-4, 5, (1, T, 4, 16), generator=g).float()
    w = torch.randint(1, 4, (1, T, 4), generator=g).float()
    k = torch.randint(-4, 5, (1, T, 16), generator=g).float()
    at = [int(T * f) for f in (0.02, 0.17, 0.44, 0.63, 0.73, 0.98)]   # rows and keys in each document
    if nan:
        q[0, at[1::2], 1, 3] = float("nan")
        w[0, at[2:4], 2] = float("nan")
        k[0, [at[0], at[0] + 1, at[4], at[4] + 1, at[5]], 5] = float("nan")
    cu = torch.tensor([0, int(T * 0.37), int(T * 0.64), T], dtype=torch.int32)
    elig = naive.eligible_mask(1, T, cu, "cpu")
    scores = naive.index_scores(q, w, k)
    ref = naive.rank_topk(scores, elig, K)
    out = {}
    for mode in ("stored", "fused"):
        orig = now._config
        now._config = lambda d, _o=orig, _m=mode: {**_o(d), "mode": _m}
        try:
            got = now.dsa_topk_triton(q.to(dev), w.to(dev), k.to(dev), K, cu.to(dev)).cpu()
        finally:
            now._config = orig
        start = row_doc_start(1, T, cu, "cpu")
        t = torch.arange(T)[:, None]
        valid = (got[0] == -1) | ((got[0] >= start[:, None]) & (got[0] <= t))
        bad = (got[0] != ref[0]).any(-1).nonzero().flatten().tolist()
        rows = []
        for r in bad[:4]:
            mine, theirs = set(got[0, r].tolist()) - {-1}, set(ref[0, r].tolist()) - {-1}
            rows.append({"row": r, "eligible": int(elig[0, r].sum()),
                         "nan_scores": int(scores[0, r][elig[0, r]].isnan().sum()), "same_set": mine == theirs,
                         "kernel_only": [[p, float(scores[0, r, p])] for p in sorted(mine - theirs)[:6]],
                         "reference_only": [[p, float(scores[0, r, p])] for p in sorted(theirs - mine)[:6]],
                         "kernel_row": got[0, r, :12].tolist()})
        out[mode] = {"equal_to_reference": not bad, "positions_valid": bool(valid.all()), "rows_differing": len(bad),
                     "first_rows": rows}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="kernels/dsa/topk.py before the change")
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="32768,131072")   # "" for the correctness check alone
    args = ap.parse_args()
    dev = torch.device("cuda")
    before = load_before(args.before)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "correctness": correctness(dev), "correctness_without_nan": correctness(dev, nan=False), "timing": {}}
    for L in (int(x) for x in args.lengths.split(",") if x):
        x = make_inputs(L, device=dev)   # bench_dsa's smooth, RoPE'd indexer inputs
        q, w, k = (x[n].detach() for n in ("q_idx", "w", "k_idx"))
        same = torch.equal(now.dsa_topk_triton(q, w, k, TOPK), before.dsa_topk_triton(q, w, k, TOPK))
        times = {"now": [], "before": []}
        for _ in range(3):   # alternating: the clock and the cache see both alike
            for name, mod in (("before", before), ("now", now)):
                times[name].append(do_bench(lambda m=mod: m.dsa_topk_triton(q, w, k, TOPK), warmup=3, rep=30))
        med = {n: sorted(v)[1] for n, v in times.items()}
        res["timing"][L] = {"ms": med, "runs_ms": times, "ratio_now_over_before": med["now"] / med["before"],
                            "same_selection": same}
        print(f"L={L}: top-k {med['now']:.2f} ms now, {med['before']:.2f} ms before "
              f"({med['now'] / med['before']:.3f}x); same selection {same}", flush=True)
    print(json.dumps({k: res[k] for k in ("correctness", "correctness_without_nan")}))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
