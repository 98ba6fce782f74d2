"""A DSA export's selection (models/hf/modeling_qwen3_moe_dsa.py) against an earlier file's, and its pieces:
  * bf16 index products through bmm's fp32 output against the fp32 products of the same values;
  * top_positions (top-k over int64 keys) against a stable sort: the same sets, and the time of each on 64 x 131,072
    scores with many ties and both zeros (a GPU);
  * select_keys of this file and of OLD_MODELING_FILE on the same inputs (4,096 queries, 16 x 64 index heads, top
    2,048 on a GPU; small on a CPU), with fp32 values and with bf16 values: how many queries choose another set, and
    for those, the widest gap between the exact (fp64) scores of the keys one side chose and the other did not,
    relative to the query's largest score (a near-tie gives a gap within rounding).

    python3 bench/probe_dsa_selection.py OLD_MODELING_FILE > $OUT/dsa_selection.jsonl
(bench/RESULTS.md, "A DSA export's chunks: causal keys, top-k without a sort, one SDPA call")"""
import importlib.util
import json
import sys
import time

import torch

sys.path.insert(0, ".")
from models.hf import modeling_qwen3_moe_dsa as new  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def pieces(g) -> dict:
    q = torch.randn(1, 512, 16, 64, device=DEV, generator=g).bfloat16()
    k = torch.randn(1, 8192, 64, device=DEV, generator=g).bfloat16()
    a = new.index_products(q, k)
    b = torch.einsum("bchd,bkd->bchk", q.float(), k.float())
    rec = {"products_dtype": str(a.dtype), "products_max_abs_diff": (a - b).abs().max().item(),
           "products_max_abs": b.abs().max().item()}
    rows, n, k = (64, 131072, 2048) if DEV == "cuda" else (8, 4096, 64)
    scores = torch.randint(-3, 4, (rows, n), device=DEV, generator=g).float() * 0.5
    scores[torch.rand(scores.shape, device=DEV, generator=g) < 0.2] = -0.0
    allowed = torch.rand(scores.shape, device=DEV, generator=g) < 0.7
    ranked = lambda: scores.masked_fill(~allowed, float("-inf")).sort(dim=-1, descending=True, stable=True)  # noqa
    ours = new.top_positions(scores, allowed, k).sort(-1).values
    rec["top_positions_equal_sort"] = bool(torch.equal(ours, ranked().indices[:, :k].sort(-1).values))
    for name, fn in (("top_positions", lambda: new.top_positions(scores, allowed, k)),
                     ("stable_sort", lambda: ranked().indices[:, :k])):
        fn()
        if DEV == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        if DEV == "cuda":
            torch.cuda.synchronize()
        rec[f"{name}_ms_{rows}x{n}"] = round((time.perf_counter() - t0) / 5 * 1000, 2)
    return rec


def against(old, g) -> dict:
    t, hi, di, k = (4096, 16, 64, 2048) if DEV == "cuda" else (600, 4, 8, 32)
    q = torch.randn(1, t, hi, di, device=DEV, generator=g)
    keys = torch.randn(1, t, di, device=DEV, generator=g)
    w = torch.randn(1, t, hi, device=DEV, generator=g) * 0.1
    allowed = new.allowed_keys(None, 1, t, t, 0, t, DEV)
    rec = {}
    for name, (qq, kk) in {"fp32": (q, keys), "bf16_values": (q.bfloat16().float(), keys.bfloat16().float())}.items():
        sets = []
        for code in (new, old):
            sel, valid = code.select_keys(qq, w, kk, allowed, k)
            sets.append(torch.where(valid, sel, -1).sort(-1).values[0])
        differ = (sets[0] != sets[1]).any(-1)
        u = torch.einsum("bchd,bkd->bchk", qq.double(), kk.double()).relu()
        exact = (u * w.double().unsqueeze(-1)).sum(2)[0].masked_fill(~allowed[0], float("-inf"))
        widest = 0.0
        for i in torch.nonzero(differ).flatten().tolist():
            swapped = sorted(x for x in set(sets[0][i].tolist()) ^ set(sets[1][i].tolist()) if x >= 0)
            vals, top = exact[i, swapped], exact[i][exact[i] > float("-inf")].abs().max()
            widest = max(widest, ((vals.max() - vals.min()) / top).item())
        rec[name] = {"queries": t, "differ": int(differ.sum()), "widest_relative_gap_of_swapped": widest}
    return rec


def main():
    from bench.cli import existing_file, parser
    ap = parser(__doc__)
    ap.add_argument("old_modeling_file", type=existing_file, help="the earlier modeling_qwen3_moe_dsa.py")
    spec = importlib.util.spec_from_file_location("old_dsa", ap.parse_args().old_modeling_file)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    g = torch.Generator(device=DEV).manual_seed(0)
    print(json.dumps({"device": DEV, **pieces(g), "against_old": against(old, g)}), flush=True)


if __name__ == "__main__":
    main()
