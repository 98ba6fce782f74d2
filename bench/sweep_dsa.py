"""GPU: tile sizes and variants of every DSA kernel at one length, each timed alone.

    python bench/sweep_dsa.py --L 131072 --out $OUT/dsa_sweep.json

The shapes and inputs are bench_dsa.py's (B = 1, 32 q / 4 kv heads, d 128, indexer 16 x 64,
top-k 2048, bf16, smooth indexer inputs). Each piece (top-k selection, union plan, sparse attention
forward / backward, sparse indexer loss forward / backward) runs under every candidate launch
configuration by swapping the module's `_config` (the kernels read their tile sizes from it at
launch), and the JSON lists the median milliseconds of each. The variants that change arithmetic
are checked against the earlier ones in the same run: the bitonic-merge plan against the full sort,
the indexer-loss backward from the cached head-summed P against the recomputing one. A configuration that fails to compile or run is recorded and skipped.
The `plan_subset` piece times the union plan of a context-parallel rank's rows (the second half,
positions over all L keys) with the bitmap builder against the merge builder.
The `loss_dense_tiles` piece times the warm-up's KL with its backward on token x key tiles
(kernels/dsa/indexer_loss_dense.py) under its launch settings, and profiles its kernels (the 4-token
blocks it replaced were timed against it in the same runs, bench/RESULTS.md).
The `loss_dense_cp` piece times the warm-up's KL of a context-parallel rank (cp = 2, both ranks) with its
backward through autograd and at once; `loss_dense_cp_rows` times it (at once) with the row chunks that
hold none of the rank's rows skipped, against launching them (cp = 2 and 8).
The `topk_fp8` piece times a design measured and dropped (FP8 index scores) against the bf16 top-k,
with the share of the bf16 selection it keeps.
The chosen defaults go into the `_config` functions by hand, with the numbers in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cli import require_gpus  # noqa: E402

from bench.bench_dsa import TOPK, D, make_inputs, rel, timed  # noqa: E402
from kernels.dsa import indexer_loss as il  # noqa: E402
from kernels.dsa import plan as pl  # noqa: E402
from kernels.dsa import sparse_attn as sa  # noqa: E402
from kernels.dsa import topk as tk  # noqa: E402
from kernels.dsa.common import pow2, row_doc_start  # noqa: E402
from kernels.dsa.plan import build_sparse_plan  # noqa: E402


@contextlib.contextmanager
def patched(module, **overrides):
    """Launch configuration of `module` with some keys replaced."""
    orig_cfg = module._config
    module._config = lambda *a, **k: {**orig_cfg(*a, **k), **overrides}
    try:
        yield
    finally:
        module._config = orig_cfg


OUT_PATH = None
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_indexer_fp8(q_idx, w, k_idx):
    """(q8, w32, k8) for the `topk_fp8` piece (a measured and dropped design, bench/RESULTS.md):
    q_idx scaled per (token, head), k_idx per tensor (LayerNorm'd: every token about the same
    norm), so that the largest magnitude maps to 448, cast to float8_e4m3fn. The scales are
    positive, so w relu((sq q8) . (sk k8)) = (w sq sk) relu(q8 . k8): the score kernels run
    unchanged on fp8 tiles with fp32 weights w32 = w * sq * sk."""
    q, k = q_idx.float(), k_idx.float()
    sq = q.abs().amax(dim=-1, keepdim=True) / FP8_MAX
    sq = torch.where(sq > 0, sq, torch.ones_like(sq))
    sk = k.abs().amax() / FP8_MAX
    sk = torch.where(sk > 0, sk, torch.ones_like(sk))
    q8 = (q / sq).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
    k8 = (k / sk).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
    return q8, (w.float() * sq.squeeze(-1) * sk).contiguous(), k8


class CPRank:
    """The warm-up's KL of one context-parallel rank (parallel/context/dsa._dense_kl_triton) on the
    benchmark's one document: the rank's rows of the sequence split (chunks r and 2 cp - 1 - r), its
    indexer inputs as leaves whose gradients `grads` takes (and clears)."""

    def __init__(self, q, k, qi, w, ki, scale: float, cp: int, rank: int):
        from parallel.context.split import cp_global_indices
        self.pos = cp_global_indices(q.shape[1], cp, rank, q.device)
        self.start = torch.zeros_like(self.pos)  # one document: every row starts at key 0
        self.q, self.k, self.scale = q[0][self.pos], k[0], scale  # [rows, heads, dim]
        self.leaves = [t[0][self.pos].clone().requires_grad_(True) for t in (qi, w)] + [
            ki[0].clone().requires_grad_(True)]

    def _kl(self, grad=None):
        from parallel.context.dsa import _dense_kl_triton
        return _dense_kl_triton(self.q, self.k, *self.leaves, self.pos, self.start, self.scale, grad=grad)

    def autograd(self):
        self._kl().backward()

    def at_once(self):
        self._kl(grad=1.0)

    def grads(self):
        got = [t.grad.clone() for t in self.leaves]
        for t in self.leaves:
            t.grad = None
        return got


def grads_apart(a, b) -> dict:
    """Relative RMSE of two (dq_idx, dw, dk_idx) triples, by name."""
    return {n: rel(x, y) for n, x, y in zip(("dq_idx", "dw", "dk_idx"), a, b)}


def cp_ranks(name: str, cases, measure, inputs, res: dict) -> None:
    """res[name]["cp{cp}_rank{rank}"] = measure(CPRank(*inputs, cp, rank)) plus the rank's rows, for each
    (cp, rank) in cases, each rank's buffers freed before the next."""
    out = res[name] = {}
    for cp, rank in cases:
        r = CPRank(*inputs, cp, rank)
        row = {**measure(r), "rows": r.pos.numel()}
        del r
        torch.cuda.empty_cache()
        out[f"cp{cp}_rank{rank}"] = row
        print(f"{name} cp {cp} rank {rank}:", row, flush=True)
        dump(res)


def selection_overlap(a, b, rows=4096):
    """Fraction of the valid entries of a [B, T, K] (ascending, -1 padded) that b's rows hold."""
    hit = tot = 0
    a2, b2 = a.flatten(0, 1), b.flatten(0, 1)
    for r0 in range(0, a2.shape[0], rows):
        x, y = a2[r0:r0 + rows].contiguous(), b2[r0:r0 + rows].contiguous()
        y = torch.where(y >= 0, y, torch.iinfo(torch.int32).max)  # keep the rows sorted
        pos = torch.searchsorted(y, x).clamp_max(y.shape[1] - 1)
        hit += ((y.gather(1, pos) == x) & (x >= 0)).sum().item()
        tot += (x >= 0).sum().item()
    return hit / max(1, tot)


def dump(results):
    """Write the JSON after every piece, so a run cut short by a time limit keeps what it did."""
    if OUT_PATH:
        with open(OUT_PATH, "w") as f:
            json.dump(results, f, indent=1, default=str)


def run_topk_variants(name, variants, qi, w, ki, ref_idx, results, quick):
    """Top-k selection under each (config overrides, call kwargs) pair: median ms, whether the
    indices equal ref_idx, and the rows that needed the exact fallback."""
    rows = []
    for ov, kw in variants:
        label = ",".join(f"{k}={v}" for k, v in {**ov, **kw}.items()) or "default"
        try:
            with patched(tk, **ov):
                st = {}
                out = tk.dsa_topk_triton(qi, w, ki, TOPK, stats=st, **kw)
                same = bool(torch.equal(out, ref_idx))
                del out
                torch.cuda.synchronize()
                ms = timed(lambda: tk.dsa_topk_triton(qi, w, ki, TOPK, **kw), quick)
            rows.append({"config": {**ov, **kw}, "ms": ms, "same_idx": same,
                         "fallback_rows": st.get("fallback_rows")})
            print(f"{name:10s} {label:60s} {ms:9.2f} ms same={same} "
                  f"fallback={st.get('fallback_rows')}", flush=True)
        except Exception as e:
            rows.append({"config": {**ov, **kw}, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{name:10s} {label:60s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch.cuda.empty_cache()
    ok = [r for r in rows if "ms" in r and r["same_idx"]]
    results[name] = {"variants": rows, "best": min(ok, key=lambda r: r["ms"]) if ok else None}
    dump(results)


def run_variants(name, module, variants, fn, results, quick):
    rows = []
    for ov in variants:
        label = ",".join(f"{k}={v}" for k, v in ov.items()) or "default"
        try:
            with patched(module, **dict(ov)):
                fn()  # compile outside the timing
                torch.cuda.synchronize()
                ms = timed(fn, quick)
            rows.append({"config": ov, "ms": ms})
            print(f"{name:10s} {label:60s} {ms:9.2f} ms", flush=True)
        except Exception as e:  # compile failure, out of resources: record and go on
            rows.append({"config": ov, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{name:10s} {label:60s} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)
        torch.cuda.empty_cache()
    ok = [r for r in rows if "ms" in r]
    results[name] = {"variants": rows, "best": min(ok, key=lambda r: r["ms"]) if ok else None}
    dump(results)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=131072)
    ap.add_argument("--out", default="dsa_sweep.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated pieces to sweep")
    args = ap.parse_args()
    require_gpus(__file__)
    t0 = time.time()
    only = set(filter(None, args.only.split(",")))
    want = (lambda p: not only or p in only)
    global OUT_PATH
    OUT_PATH = args.out
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    L = args.L
    x = make_inputs(L)
    qi, w, ki = (x[n].detach() for n in ("q_idx", "w", "k_idx"))
    q, k, v, do = (x[n].detach() for n in ("q", "k", "v", "do"))
    scale = D ** -0.5
    res = {"L": L, "device": torch.cuda.get_device_name(), "checks": {}}
    idx = tk.dsa_topk_triton(qi, w, ki, TOPK)
    start = row_doc_start(1, L, None, q.device)
    gscale = torch.full((1,), 1.0 / L, device=q.device)

    # --- arithmetic checks of the new variants against the earlier ones ------------------------
    try:
        a = build_sparse_plan(idx, 4, merge=True)
        b = build_sparse_plan(idx, 4, merge=False)
        res["checks"]["plan_merge_equals_sort"] = bool(
            torch.equal(a.offsets_N1, b.offsets_N1) and torch.equal(a.pos_U, b.pos_U)
            and torch.equal(a.bits_U, b.bits_U))
        plan = a
        o, lse = sa.sparse_attn_fwd(q, k, v, plan, scale)
        kl, lse_i, z, psum = il.indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale,
                                               keep_psum=True)
        r1 = il.indexer_kl_bwd(qi, w, ki, q, k, lse, plan, scale, lse_i, z, gscale)
        r2 = il.indexer_kl_bwd(qi, w, ki, q, k, lse, plan, scale, lse_i, z, gscale,
                               psum=psum)
        res["checks"]["loss_bwd_cached_vs_recompute_rel"] = grads_apart(r1, r2)
        c1 = build_sparse_plan(idx, 4, one_pass=False)
        res["checks"]["plan_one_pass_equals_two_pass"] = bool(
            torch.equal(a.offsets_N1, c1.offsets_N1) and torch.equal(a.pos_U, c1.pos_U)
            and torch.equal(a.bits_U, c1.bits_U))
        del c1
        kl_f, lse_i_f, z_f, psum_f = il.indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale,
                                                       keep_psum=True, split=False)
        kl_s, lse_i_s, z_s, psum_s = il.indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale,
                                                       keep_psum=True, split=True)
        res["checks"]["loss_fwd_split_vs_fused"] = {
            "kl_rel": rel(kl_f, kl_s), "z_rel": rel(z_f, z_s), "lse_i_equal": bool(torch.equal(lse_i_f, lse_i_s)),
            "psum_rel": rel(psum_f.float(), psum_s.float()), "psum_equal": bool(torch.equal(psum_f, psum_s))}
        del kl_f, lse_i_f, z_f, psum_f, kl_s, lse_i_s, z_s, psum_s
        res["checks"]["psum_bytes"] = psum.numel() * psum.element_size()
        res["checks"]["plan_union_entries"] = plan.pos_U.numel()
        del r1, r2
    except Exception as e:
        res["checks"]["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        res["checks"]["trace"] = traceback.format_exc()[-2000:]
        plan = build_sparse_plan(idx, 4)
        o, lse = sa.sparse_attn_fwd(q, k, v, plan, scale)
    print("checks:", json.dumps(res["checks"], default=str)[:1500], flush=True)

    # --- timings ------------------------------------------------------------------------------
    if want("topk"):
        ref_idx = idx
        with patched(tk, mode="fused"):
            fused_idx = tk.dsa_topk_triton(qi, w, ki, TOPK)
        diff = (fused_idx != ref_idx).any(-1)
        res["checks"]["topk_stored_vs_fused_rows_differing"] = int(diff.sum())
        del fused_idx, diff
        # the variants bench/RESULTS.md and topk._config cite (the default first; since the
        # 2026-12-01 round BC=1024 and warps_select=4 are the default, so those two re-time it)
        fused = {"mode": "fused"}
        big = {"chunk_bytes": 2 << 30}
        half = {"chunk_bytes": 512 << 20}
        plain = {"store": 0, "stages_score": 1, "BN": 128}  # tl.store: nothing hoisted
        run_topk_variants("topk", (
            ({}, {}), (fused, {}), (plain, {}), ({"BN": 64}, {}), ({"stages_score": 2}, {}),
            ({"warps_score": 4}, {}), ({"KS": 1024}, {}), ({"KS": 4096}, {}), ({}, half),
            (fused, half), (plain, half), ({}, big), ({"warps_compact": 8}, {}), ({"BC": 1024}, {}),
            ({"asm_stores": 0}, {}), ({"warps_select": 4}, {}), ({"warps_select": 16}, {})),
            qi, w, ki, ref_idx, res, args.quick)
    if want("topk_tail"):  # the selector's chunking and select variants (2026-12-01 round)
        # (the whole-row select of the round, select_sub=0, score lines cut to each chunk's longest
        # row, chunk_area, and two tiles of compact prefetch are removed; their numbers are in
        # topk._config). The default and the compact before the round (prefetch=0, BC=2048) are
        # timed first and last: their drift over the run bounds what the other rows can show.
        run_topk_variants("topk_tail", (
            ({}, {}), ({"prefetch": 0, "BC": 2048}, {}), ({"prefetch": 1, "BC": 2048}, {}),
            ({"BC": 512}, {}), ({"BC": 4096}, {}), ({"warps_compact": 2}, {}),
            ({"select_sub": 2048}, {}), ({}, {"chunk_bytes": 2 << 30}),
            ({"prefetch": 0, "BC": 2048}, {}), ({}, {})), qi, w, ki, idx, res, args.quick)
    if want("plan"):
        rows = []
        for merge, warps, one in ((True, 8, True), (True, 4, True), (True, 4, False),
                                  (False, 8, False)):
            cfg = {"merge": merge, "warps": warps, "one_pass": one}
            try:
                f = (lambda m=merge, nw=warps, o=one: build_sparse_plan(
                    idx, 4, method="triton", merge=m, num_warps=nw, one_pass=o))
                f()
                ms = timed(f, args.quick)
                rows.append({"config": cfg, "ms": ms})
                print(f"plan       {json.dumps(cfg):60s} {ms:9.2f} ms", flush=True)
            except Exception as e:
                rows.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        ref = build_sparse_plan(idx, 4)
        # the bitmap builder (the default): the variants bench/RESULTS.md and plan._config cite
        for ov in ({}, {"bits_emit": 8192, "warps_emit": 4}, {"bits_emit": 16384, "warps_emit": 4},
                   {"bits_emit": 8192}, {"bits_emit": 32768}, {"warps_emit": 1},
                   {"bits_emit": 8192, "warps_emit": 1}, {"warps_mark": 8}, {"chunk_bytes": 1 << 30}):
            cfg = {"method": "bitmap", **ov}
            kw = {"chunk_bytes": ov["chunk_bytes"]} if "chunk_bytes" in ov else {}
            try:
                with patched(pl, **{a: b for a, b in ov.items() if a != "chunk_bytes"}):
                    f = (lambda kw=kw: build_sparse_plan(idx, 4, method="bitmap", **kw))
                    got = f()
                    same = bool(torch.equal(got.offsets_N1, ref.offsets_N1)
                                and torch.equal(got.pos_U, ref.pos_U)
                                and torch.equal(got.bits_U, ref.bits_U))
                    del got
                    ms = timed(f, args.quick)
                rows.append({"config": cfg, "ms": ms, "same_plan": same})
                print(f"plan       {json.dumps(cfg):60s} {ms:9.2f} ms same={same}", flush=True)
            except Exception as e:
                rows.append({"config": cfg, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"plan       {json.dumps(cfg):60s} FAILED {type(e).__name__}: {str(e)[:200]}",
                      flush=True)
        del ref
        ok = [r for r in rows if "ms" in r and r.get("same_plan", True)]
        res["plan"] = {"variants": rows, "best": min(ok, key=lambda r: r["ms"]) if ok else None}
    if want("plan_subset"):
        # a context-parallel rank's rows (cp = 2, sequence split: the second half, the rows that reach
        # the most keys) select among all L keys: the bitmap builder with n_keys, against the merge
        # builder that this path used before it took n_keys; the same plan from both
        sub = idx[:, L // 2:].contiguous()
        out = {"rows": sub.shape[1], "n_keys": L}
        try:
            merge = build_sparse_plan(sub, 4, method="triton", n_keys=L)
            bitmap = build_sparse_plan(sub, 4, method="bitmap", n_keys=L)
            out["same_plan"] = bool(torch.equal(merge.offsets_N1, bitmap.offsets_N1)
                                    and torch.equal(merge.pos_U, bitmap.pos_U)
                                    and torch.equal(merge.bits_U, bitmap.bits_U))
            del merge, bitmap
            for name, f in (("merge_ms", lambda: build_sparse_plan(sub, 4, method="triton", n_keys=L)),
                            ("bitmap_ms", lambda: build_sparse_plan(sub, 4, method="bitmap", n_keys=L)),
                            ("merge_ms_again", lambda: build_sparse_plan(sub, 4, method="triton", n_keys=L)),
                            ("bitmap_ms_again", lambda: build_sparse_plan(sub, 4, method="bitmap", n_keys=L)),
                            ("all_rows_bitmap_ms", lambda: build_sparse_plan(idx, 4, method="bitmap"))):
                out[name] = timed(f, args.quick)
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["plan_subset"] = out
        print("plan subset:", out, flush=True)
    if want("attn_fwd"):
        run_variants("attn_fwd", sa, [
            {}, {"BS_fwd": 64, "warps_fwd": 8}, {"BS_fwd": 64, "warps_fwd": 4}, {"BS_fwd": 256, "warps_fwd": 8},
            {"BS_fwd": 128, "warps_fwd": 8}, {"BS_fwd": 128, "warps_fwd": 2}, {"BS_fwd": 256, "warps_fwd": 4},
            {"stages_fwd": 3}, {"stages_fwd": 4},
            {"stages_fwd": 1},
        ], lambda: sa.sparse_attn_fwd(q, k, v, plan, scale), res, args.quick)
    if want("attn_bwd"):
        run_variants("attn_bwd", sa, [
            {}, {"BS_bwd": 128, "warps_bwd": 8}, {"BS_bwd": 64, "warps_bwd": 4}, {"BS_bwd": 16},
            {"BS_bwd": 32, "warps_bwd": 8}, {"BS_bwd": 32, "warps_bwd": 2}, {"BS_bwd": 32, "stages_bwd": 2},
            # registers per thread: uncapped (two programs per SM), 168 (three), 128 (four); the
            # default caps at 168 up to 64K tokens (sparse_attn._config); the default again last
            # (and the uncapped twice below) shows the run's drift
            {"maxnreg_bwd": None}, {"maxnreg_bwd": 168}, {"maxnreg_bwd": 128}, {},
        ], lambda: sa.sparse_attn_bwd(q, k, v, o, do, lse, plan, scale), res, args.quick)
    if want("attn_bwd_packed"):  # packed documents: the register cap against the document length
        for doc in (8192, 16384, 32768, 65536):
            if doc >= L:
                continue
            cu = torch.arange(0, L + 1, doc, dtype=torch.int32, device=q.device)
            idx_p = tk.dsa_topk_triton(qi, w, ki, TOPK, cu_seqlens=cu)
            plan_p = build_sparse_plan(idx_p, 4, cu_seqlens=cu)  # max_doc_len = doc: the default caps
            o_p, lse_p = sa.sparse_attn_fwd(q, k, v, plan_p, scale)
            run_variants(f"attn_bwd_packed{doc}", sa, [{"maxnreg_bwd": None}, {"maxnreg_bwd": 168},
                                                       {"maxnreg_bwd": None}, {}],
                         lambda: sa.sparse_attn_bwd(q, k, v, o_p, do, lse_p, plan_p, scale), res,
                         args.quick)
            del idx_p, plan_p, o_p, lse_p
    if want("loss_fwd"):
        run_variants("loss_fwd", il, [
            {}, {"split_fwd": False}, {"split_fwd": False, "BS_fwd": 64, "warps": 4},
            {"split_fwd": False, "BS_fwd": 256, "warps": 8}, {"split_fwd": False, "BS_fwd": 32, "warps": 8},
            {"BS_psum": 128, "warps_psum": 4, "stages_split": 2, "BS_kl": 128},  # the first split tiles
            {"BS_psum": 128, "warps_psum": 4, "stages_split": 2},
            {"BS_psum": 128, "warps_psum": 2}, {"BS_psum": 64, "warps_psum": 4},
            {"BS_psum": 256, "warps_psum": 8}, {"stages_split": 2}, {"stages_split": 4},
            {"BS_kl": 128}, {"BS_kl": 32, "warps_kl": 2}, {"BS_kl": 64, "warps_kl": 2},
            {"chunk_bytes": 64 << 20}, {"chunk_bytes": 1 << 30}, {"chunk_bytes": 8 << 30},
        ], lambda: il.indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale,
                                     keep_psum=True), res, args.quick)
    if want("loss_bwd"):
        kl, lse_i, z, psum = il.indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale,
                                               keep_psum=True)
        run_variants("loss_bwd_recompute", il, [{}, {"BS_bwd": 16, "warps_bwd": 8}, {"warps_bwd": 8}],
                     lambda: il.indexer_kl_bwd(qi, w, ki, q, k, lse, plan, scale,
                                               lse_i, z, gscale), res, args.quick)
        run_variants("loss_bwd", il, [
            {}, {"BS_bwd_p": 32}, {"BS_bwd_p": 64}, {"warps": 8}, {"warps": 2}, {"stages_bwd_p": 2},
            {"stages_bwd_p": 1}, {"BS_bwd_p": 64, "warps": 2},
        ], lambda: il.indexer_kl_bwd(qi, w, ki, q, k, lse, plan, scale, lse_i, z, gscale,
                                     psum=psum), res, args.quick)
    if want("loss_dense_tiles"):  # the warm-up KL on token x key tiles (kernels/dsa/indexer_loss_dense.py)
        from bench.profile_dsa import profile_kernels
        from kernels.dsa import indexer_loss_dense as ild
        start_d = row_doc_start(1, L, None, q.device)
        lse_d = ild.dense_attention_lse(q, k, scale, start_d)
        # round 1 (2026-12-01, 32K): BN_d 128 (-19 ms), 3 stages (-21), BQ_dq 4 with 4 warps (-4) from 8 / 64 / 8
        # warps / 2 stages; round 2: KS 1024 (-1.6 ms at 32K, -0.7 at 8K), the lse kernel with 2 stages (-1.1);
        # round 3: lse_I on 128 x 128 tiles, dq with 3 stages, the lse kernel on 128-key tiles (-1.2, -1.0, -0.6).
        # The defaults combine them; these vary them again. Each variant is checked against the first.
        variants = [{}, {"BN_d": 64}, {"KS": 2048}, {"stages_d": 4}, {"BM_d": 32, "BN_d": 128, "warps_d": 4},
                    {"stages_dq": 2}, {"stages_dk": 3}, {"stages_lse": 3}, {"BM_lse": 64}, {"BQ_dk": 4, "BN_dk": 128},
                    {"BN_dq": 128}, {"chunk_bytes": 256 << 20}]
        if args.quick:
            variants = variants[:1]
        rows, ref = [], None
        for ov in variants:
            try:
                def tiles():
                    return ild.dense_kl_fwd_bwd(qi, w, ki, q, k, lse_d, start_d, scale, gscale, cfg=ov)
                kl_t, g_t = tiles()
                if ref is None:
                    ref = (kl_t, g_t)
                diff = {"kl": rel(ref[0], kl_t), **grads_apart(ref[1], g_t)}
                ms = [timed(tiles, args.quick) for _ in range(2)]
                row = {"config": ov, "ms": ms, "rel_to_first": diff}
                if not ov:
                    row["kernels_ms"] = [r for r in profile_kernels(tiles, 3) if r["ms"] > 0.05]
                rows.append(row)
                print(f"loss_dense_tiles {json.dumps(ov):60s} {ms[0]:8.2f} {ms[1]:8.2f} ms "
                      f"rel {max(diff.values()):.1e}", flush=True)
            except Exception as e:
                rows.append({"config": ov, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"loss_dense_tiles {json.dumps(ov):60s} FAILED {type(e).__name__}: {str(e)[:150]}",
                      flush=True)
            torch.cuda.empty_cache()
        for ov in ({}, {"stages_att": 3}, {"BN_att": 64}, {"BM_att": 64, "warps_att": 4}):
            try:
                lse_v = ild.dense_attention_lse(q, k, scale, start_d, cfg=ov)
                rows.append({"config": {"lse": ov}, "rel_to_first": rel(lse_d, lse_v),
                             "ms": [timed(lambda: ild.dense_attention_lse(q, k, scale, start_d, cfg=ov), args.quick)]})
            except Exception as e:
                rows.append({"config": {"lse": ov}, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print("loss_dense_tiles", rows[-1], flush=True)

        def with_lse():
            return ild.dense_kl_fwd_bwd(qi, w, ki, q, k, ild.dense_attention_lse(q, k, scale, start_d), start_d,
                                        scale, gscale)
        rows.append({"config": "lse + KL + gradients", "ms": [timed(with_lse, args.quick)]})
        print("loss_dense_tiles", rows[-1], flush=True)
        res["loss_dense_tiles"] = rows
        dump(res)
    if want("loss_dense_cp"):  # the warm-up's KL of one context-parallel rank (cp = 2): autograd vs at once
        def autograd_vs_at_once(r):
            r.autograd()
            g_autograd = r.grads()
            r.at_once()
            return {**grads_apart(r.grads(), g_autograd), "autograd_ms": timed(r.autograd, args.quick),
                    "at_once_ms": timed(r.at_once, args.quick)}
        cp_ranks("loss_dense_cp", ((2, 0), (2, 1)), autograd_vs_at_once, (q, k, qi, w, ki, scale), res)
    if want("loss_dense_cp_rows"):  # a CP rank's warm-up KL: row chunks it does not hold skipped or launched
        import kernels.dsa.indexer_loss_dense as ild
        real = ild.indexer_kl_dense

        def all_rows(*a, rows=None, **kw):  # the rows without keys launched, as before `rows`
            return real(*a, **kw)

        def held_vs_all(r):
            r.at_once()
            g_rows = r.grads()
            ild.indexer_kl_dense = all_rows
            try:
                r.at_once()
                row = {**grads_apart(r.grads(), g_rows), "all_rows_ms": timed(r.at_once, args.quick)}
            finally:
                ild.indexer_kl_dense = real
            row["held_rows_ms"] = timed(r.at_once, args.quick)
            return {**row, "speedup": row["all_rows_ms"] / row["held_rows_ms"]}
        cp_ranks("loss_dense_cp_rows", ((2, 0), (2, 1), (8, 0), (8, 7)), held_vs_all, (q, k, qi, w, ki, scale), res)
    if want("block8"):  # 8 tokens per union block: 64 query rows per program, fewer atomics
        try:
            plan8 = build_sparse_plan(idx, 8)
            o8, lse8 = sa.sparse_attn_fwd(q, k, v, plan8, scale)
            res["block8_union_per_block"] = plan8.mean_union()
            run_variants("attn_fwd_bq8", sa, [{"BS_fwd": 64, "warps_fwd": 4}, {"BS_fwd": 128, "warps_fwd": 4},
                                              {"BS_fwd": 64, "warps_fwd": 8}, {"BS_fwd": 128, "warps_fwd": 8}],
                         lambda: sa.sparse_attn_fwd(q, k, v, plan8, scale), res, args.quick)
            run_variants("attn_bwd_bq8", sa, [{"BS_bwd": 32, "warps_bwd": 8},
                                              {"BS_bwd": 32, "warps_bwd": 4}, {"BS_bwd": 16, "warps_bwd": 4},
                                              {"BS_bwd": 64, "warps_bwd": 8}, {"BS_bwd": 16, "warps_bwd": 8}],
                         lambda: sa.sparse_attn_bwd(q, k, v, o8, do, lse8, plan8, scale), res,
                         args.quick)
            t_plan8 = timed(lambda: build_sparse_plan(idx, 8), args.quick)
            res["plan_bq8"] = {"ms": t_plan8}
            print(f"plan_bq8   {'default':60s} {t_plan8:9.2f} ms", flush=True)
            run_variants("loss_fwd_bq8", il, [{}, {"warps": 8}, {"BS_fwd": 32, "warps": 8}],
                         lambda: il.indexer_kl_fwd(qi, w, ki, q, k, lse8, plan8, scale,
                                                   keep_psum=True), res, args.quick)
            _, lse_i8, z8, psum8 = il.indexer_kl_fwd(qi, w, ki, q, k, lse8, plan8, scale,
                                                     keep_psum=True)
            run_variants("loss_bwd_bq8", il, [{}, {"warps": 8}],
                         lambda: il.indexer_kl_bwd(qi, w, ki, q, k, lse8, plan8, scale,
                                                   lse_i8, z8, gscale, psum=psum8), res, args.quick)
        except Exception as e:
            res["block8_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    res["union_per_block"] = plan.mean_union()
    if want("cluster"):  # how the union entries of a block fall into tiles of BK adjacent keys
        blk = torch.repeat_interleave(torch.arange(plan.num_blocks, device=q.device),
                                      plan.offsets_N1.diff())
        res["cluster"] = {}
        for bk in (16, 32, 64, 128):
            pairs = torch.unique_consecutive(blk * (L // bk + 1) + plan.pos_U.long() // bk).numel()
            res["cluster"][bk] = {"pairs": pairs, "entries_per_pair": plan.pos_U.numel() / pairs}
        print("cluster:", res["cluster"], flush=True)
        del blk
    if want("topk_pieces"):  # the selector's kernels one by one, at the module's configuration
        cfg = tk._config(q.device)
        BT, K = cfg["BT"], TOPK
        cap = tk.default_cap(K)
        M = min(2048, cap // 2)
        NBT = -(-L // BT)
        nbc = min(NBT, tk.TOPK_CHUNK_BYTES // (BT * cap * 8))
        nslot = nbc * BT
        tau = torch.empty(nslot, dtype=torch.float32, device=q.device)
        cnt = torch.empty(nslot, dtype=torch.int32, device=q.device)
        scratch = torch.empty(nslot, pow2(M), dtype=torch.float32, device=q.device)
        cs = torch.empty(nslot, cap, dtype=torch.float32, device=q.device)
        cp = torch.empty(nslot, cap, dtype=torch.int32, device=q.device)
        outk = torch.empty(1, L, K, dtype=torch.int32, device=q.device)
        fail = torch.zeros(L, dtype=torch.int32, device=q.device)
        last = torch.arange(NBT - nbc, NBT, dtype=torch.int32, device=q.device)  # the longest rows
        pieces = {}

        def time_piece(name, fn, blocks):
            try:
                fn(blocks)
                torch.cuda.synchronize()
                pieces[name] = timed(lambda: fn(blocks), args.quick)
            except Exception as e:
                pieces[name] = f"{type(e).__name__}: {str(e)[:200]}"
        for name, fn in (
                ("sample", lambda b: tk.topk_fwd_kernel_sample[(nbc,)](
                    qi, w, ki, start, b, scratch, L, NBT, cap, M, HI=16, DI=64, DIP=64, BT=BT,
                    SB=cfg["SB"], MP=pow2(M), DOT_PREC="tf32", num_warps=cfg["warps_sample"])),
                ("tau", lambda b: tk.topk_fwd_kernel_tau[(nslot,)](
                    start, b, tau, scratch, nslot, L, NBT, K, cap, M, (K + cap) // 2, BT=BT,
                    MP=pow2(M), R=1, num_warps=cfg["warps_select"])),
                ("filter", lambda b: tk.topk_fwd_kernel_filter[(nbc,)](
                    qi, w, ki, start, b, tau, cnt, cs, cp, L, NBT, cap, HI=16, DI=64, DIP=64,
                    BT=BT, BS=cfg["BS"], DOT_PREC="tf32", num_warps=cfg["warps_filter"])),
                ("select", lambda b: tk.topk_fwd_kernel_select[(nslot,)](
                    start, b, cnt, cs, cp, outk, fail, nslot, L, NBT, K, cap, BT=BT, R=1,
                    RB=pow2(cap), OB=1024, STORE=cfg["asm_stores"], SUB=cfg["select_sub"],
                    num_warps=cfg["warps_select"]))):
            time_piece(name, fn, last)
        # the stored-score path's kernels, on the last chunk of its own size
        nbs = min(NBT, tk.TOPK_CHUNK_BYTES // (BT * (L * 4 + cap * 8)))
        rows_s = nbs * BT
        buf = torch.empty(rows_s + 1, L, dtype=torch.float32, device=q.device)  # L % 16 == 0: W = L
        last_s = torch.arange(NBT - nbs, NBT, dtype=torch.int32, device=q.device)
        for name, fn in (
                ("stored_score", lambda b: tk.topk_fwd_kernel_score[
                    (-(-rows_s // cfg["RS"]), -(-L // cfg["KS"]), 1)](
                    qi, w, ki, start, b, buf, rows_s, L, NBT, K, rows_s, L, HI=16, DI=64, DIP=64,
                    BT=BT, RS=cfg["RS"], BN=cfg["BN"], KS=cfg["KS"], STORE=cfg["store"], DOT_PREC="tf32",
                    num_warps=cfg["warps_score"], num_stages=cfg["stages_score"])),
                ("stored_compact", lambda b: tk.topk_fwd_kernel_compact[(rows_s,)](
                    start, b, buf, cnt, cs, cp, rows_s, L, NBT, K, cap, M, (K + cap) // 2, L, BT=BT,
                    MP=pow2(M), BC=cfg["BC"], STORE=cfg["asm_stores"], PF=cfg["prefetch"],
                    num_warps=cfg["warps_compact"])),
                ("stored_select", lambda b: tk.topk_fwd_kernel_select[(rows_s,)](
                    start, b, cnt, cs, cp, outk, fail, rows_s, L, NBT, K, cap, BT=BT, R=1,
                    RB=pow2(cap), OB=1024, STORE=cfg["asm_stores"], SUB=cfg["select_sub"],
                    num_warps=cfg["warps_select"]))):
            time_piece(name, fn, last_s)
        del buf
        pieces["note"] = (f"fused: last {nbc} blocks of {NBT} (the longest rows), one chunk; "
                          f"stored_*: last {nbs} blocks, one chunk")
        res["topk_pieces"] = pieces
        print("topk pieces:", pieces, flush=True)
    if want("topk_fp8"):  # FP8 index scores (DeepSeek V3.2's indexer), a measured and dropped design
        r = {}
        try:
            st = {}
            idx8 = tk.dsa_topk_triton(*quantize_indexer_fp8(qi, w, ki), TOPK, stats=st)
            r["fallback_rows_fp8"] = st.get("fallback_rows")
            r["bf16_selection_kept"] = selection_overlap(idx, idx8)
            del idx8
            r["bf16_ms"] = timed(lambda: tk.dsa_topk_triton(qi, w, ki, TOPK), args.quick)
            r["fp8_ms_with_quantisation"] = timed(
                lambda: tk.dsa_topk_triton(*quantize_indexer_fp8(qi, w, ki), TOPK), args.quick)
            r["quantisation_ms"] = timed(lambda: quantize_indexer_fp8(qi, w, ki), args.quick)
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["topk_fp8"] = r
        print("topk fp8:", r, flush=True)
        dump(res)
    res["wall_seconds"] = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print("best:", json.dumps({k: v.get("best") for k, v in res.items()
                               if isinstance(v, dict) and "best" in v}, default=str))
    print(f"wrote {args.out} ({res['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
