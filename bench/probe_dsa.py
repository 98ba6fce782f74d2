"""GPU probe: what bounds each DSA kernel (variants that drop or move one cost), one length.

    python bench/probe_dsa.py --L 131072 --out $OUT/probe.json

Not a correctness path: the variants write wrong results on purpose to time what is left. Inputs
are bench_dsa.py's. Variants:
- top-k filter: the candidate append dropped (count only) or the threshold test dropped too
  (scores only), at several row / key tile sizes;
- sparse-attention backward (copies of the kernel): MODE 0 atomics as shipped, 1 plain stores in
  their place, 2 no dk / dv at all, 3 dk / dv products computed but not written, 4 / 5 / 6 the
  atomics folded into an L2-sized band of 4K / 16K / 1K keys (pos % WRAP), 7 / 8 `red.global.add`
  (scalar / v2) in inline assembly in place of the compiler's `atom` (checked to give the same sums),
  9 the reductions alone (no gathers, no products), 10 gathers and reductions without products,
  11 as 9 folded into the 4K-key band;
  ORDER 1 KV groups fastest in the grid, 2 blocks spread by a stride permutation
  (PROBE_ONLY_BWD=1 runs only these; PROBE_BWD_MODES=0,3,9 only those modes, 32-key tiles;
  with PROBE_BWD_BLOCK8=1 modes 0 / 3 / 9 over 8-token blocks instead);
- sparse-attention forward: grid orders, and keys loaded at consecutive positions instead of the
  union's (what gathering costs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cli import require_gpus  # noqa: E402

from bench.bench_dsa import TOPK, D, make_inputs, timed  # noqa: E402
from kernels.dsa import sparse_attn as sa  # noqa: E402
from kernels.dsa import topk as tk  # noqa: E402
from kernels.dsa import indexer_loss as il  # noqa: E402
from kernels.dsa.common import dot_precision, pow2, row_doc_start  # noqa: E402
from kernels.dsa.plan import build_sparse_plan  # noqa: E402


@triton.jit
def _red_f32(ptr, val, mask):
    """Fire-and-forget fp32 reduction (red, not atom: no value comes back)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p red.global.add.f32 [$1], $2; mov.u32 $0, 0; }",
        "=r,l,f,r", [ptr.to(tl.int64, bitcast=True), val, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _red_v2_f32(ptr, val, mask):
    """Two adjacent fp32 reductions in one red.v2 (the thread's element pairs are adjacent in d)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $6, 0; @p red.global.add.v2.f32 [$2], {$4, $5}; "
        "mov.u32 $0, 0; mov.u32 $1, 0; }",
        "=r,=r,l,l,f,f,r,r", [ptr.to(tl.int64, bitcast=True), val, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=2)


@triton.jit
def _probe_rows(T, NBT, NB, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr,
                ORDER: tl.constexpr):
    """Program -> (block, KV group, batch row, token of each tile row, valid rows, head row), as the
    shipped kernels map it. ORDER 0 grid (NB, HKV); 1 grid (HKV, NB), groups fastest; 2 blocks spread
    by a stride permutation."""
    if ORDER == 1:
        pid = tl.program_id(1)
        g = tl.program_id(0)
    else:
        pid = tl.program_id(0)
        g = tl.program_id(1)
    if ORDER == 2:
        pid = ((pid.to(tl.int64) * 7919) % NB).to(tl.int32)
    bb = pid // NBT
    r = tl.arange(0, BQ * GP)
    i = r // GP
    h = r % GP
    t = (pid % NBT) * BQ + i
    rvalid = (h < G) & (t < T)
    head_row = (bb * T + tl.minimum(t, T - 1)).to(tl.int64) * HQ + g * G + h
    return pid, g, bb, i, rvalid, head_row


@triton.jit
def bwd_probe(q, k, v, o, do, lse, dq, dk, dv, offsets, upos, ubits, T, NBT, NB,
              scale, HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
              GP: tl.constexpr, D: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr,
              MODE: tl.constexpr, ORDER: tl.constexpr, WRAP: tl.constexpr = 4096):
    # MODE 4: atomics into keys pos % WRAP (an L2-resident band)
    # MODE 0 atomics, 1 plain stores, 2 no dk/dv, 3 dk/dv dots without writes
    # ORDER 0 grid (NB, HKV); 1 grid (HKV, NB) groups fastest; 2 blocks spread (stride permutation)
    pid, g, bb, i, rvalid, head_row = _probe_rows(T, NBT, NB, HQ, G, GP, BQ, ORDER)
    BM: tl.constexpr = BQ * GP
    d = tl.arange(0, D)
    rmask = rvalid[:, None]
    row_off = head_row * D
    qt = tl.load(q + row_off[:, None] + d[None, :], mask=rmask, other=0.0)
    dot_ = tl.load(do + row_off[:, None] + d[None, :], mask=rmask, other=0.0)
    ot = tl.load(o + row_off[:, None] + d[None, :], mask=rmask, other=0.0)
    delta = tl.sum(ot.to(tl.float32) * dot_.to(tl.float32), axis=1)
    lse2 = tl.load(lse + head_row, mask=rvalid, other=float("inf")) * 1.4426950408889634
    scale_log2 = scale * 1.4426950408889634
    u_lo = tl.load(offsets + pid)
    u_hi = tl.load(offsets + pid + 1)
    dq_acc = tl.zeros([BM, D], dtype=tl.float32)
    sink = tl.zeros([BS, D], dtype=tl.float32)
    for u0 in range(u_lo, u_hi, BS):
        uu = u0 + tl.arange(0, BS)
        um = uu < u_hi
        pos = tl.load(upos + uu, mask=um, other=0)
        bits = tl.load(ubits + uu, mask=um, other=0)
        kv_off = ((bb * T + pos).to(tl.int64) * HKV + g) * D
        kvmask = um[:, None]
        if MODE >= 9:  # 9: the reductions alone (no gathers, no products); 10: gathers too;
            # 11: as 9 into the L2-sized band of WRAP keys
            if MODE == 11:
                kv_off = ((bb * T + pos % WRAP).to(tl.int64) * HKV + g) * D
            if MODE != 10:
                val_v = (pos[:, None] + d[None, :]).to(tl.float32)
                val_k = val_v
            else:
                val_v = tl.load(v + kv_off[:, None] + d[None, :], mask=kvmask,
                                other=0.0).to(tl.float32)
                val_k = tl.load(k + kv_off[:, None] + d[None, :], mask=kvmask,
                                other=0.0).to(tl.float32)
            tl.atomic_add(dv + kv_off[:, None] + d[None, :], val_v, mask=kvmask, sem="relaxed")
            tl.atomic_add(dk + kv_off[:, None] + d[None, :], val_k, mask=kvmask, sem="relaxed")
        else:
            kt = tl.load(k + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0)
            vt = tl.load(v + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0)
            s = tl.dot(qt, tl.trans(kt)) * scale_log2
            member = (((bits[None, :] >> i[:, None]) & 1) != 0) & um[None, :] & rvalid[:, None]
            p = tl.where(member, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(dot_, tl.trans(vt))
            ds = p * (dp - delta[:, None])
            dq_acc += tl.dot(ds.to(kt.dtype), kt)
            if MODE != 2:
                dv_t = tl.dot(tl.trans(p.to(dot_.dtype)), dot_)
                dk_t = tl.dot(tl.trans(ds.to(qt.dtype)), qt) * scale
                if MODE == 7:
                    m2 = kvmask & (d[None, :] >= 0)
                    _red_f32(dv + kv_off[:, None] + d[None, :], dv_t, m2)
                    _red_f32(dk + kv_off[:, None] + d[None, :], dk_t, m2)
                elif MODE == 8:
                    m2 = kvmask & (d[None, :] >= 0)
                    _red_v2_f32(dv + kv_off[:, None] + d[None, :], dv_t, m2)
                    _red_v2_f32(dk + kv_off[:, None] + d[None, :], dk_t, m2)
                elif MODE >= 4:
                    wrap = ((bb * T + pos % WRAP).to(tl.int64) * HKV + g) * D
                    tl.atomic_add(dv + wrap[:, None] + d[None, :], dv_t, mask=kvmask, sem="relaxed")
                    tl.atomic_add(dk + wrap[:, None] + d[None, :], dk_t, mask=kvmask, sem="relaxed")
                elif MODE == 0:
                    tl.atomic_add(dv + kv_off[:, None] + d[None, :], dv_t, mask=kvmask, sem="relaxed")
                    tl.atomic_add(dk + kv_off[:, None] + d[None, :], dk_t, mask=kvmask, sem="relaxed")
                elif MODE == 1:
                    tl.store(dv + kv_off[:, None] + d[None, :], dv_t, mask=kvmask)
                    tl.store(dk + kv_off[:, None] + d[None, :], dk_t, mask=kvmask)
                else:
                    sink += dv_t + dk_t
    tl.store(dq + row_off[:, None] + d[None, :], (dq_acc * scale).to(dq.dtype.element_ty),
             mask=rmask)
    if MODE == 3:
        tl.store(dk + pid * 0 + tl.arange(0, BS)[:, None] * D + d[None, :], sink,
                 mask=(tl.sum(sink) == 12345.0))


@triton.jit
def fwd_probe(q, k, v, o, lse, offsets, upos, ubits, T, NBT, NB, scale_log2,
              HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
              D: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr, ORDER: tl.constexpr,
              CONTIG: tl.constexpr):
    # CONTIG: load keys at consecutive positions instead of the union's (gather cost probe)
    pid, g, bb, i, rvalid, head_row = _probe_rows(T, NBT, NB, HQ, G, GP, BQ, ORDER)
    BM: tl.constexpr = BQ * GP
    d = tl.arange(0, D)
    row_off = head_row * D
    qt = tl.load(q + row_off[:, None] + d[None, :], mask=rvalid[:, None], other=0.0)
    u_lo = tl.load(offsets + pid)
    u_hi = tl.load(offsets + pid + 1)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, D], dtype=tl.float32)
    for u0 in range(u_lo, u_hi, BS):
        uu = u0 + tl.arange(0, BS)
        um = uu < u_hi
        pos = tl.load(upos + uu, mask=um, other=0)
        bits = tl.load(ubits + uu, mask=um, other=0)
        if CONTIG:
            pos = (uu - u_lo) % T
        kv_off = ((bb * T + pos).to(tl.int64) * HKV + g) * D
        kt = tl.load(k + kv_off[:, None] + d[None, :], mask=um[:, None], other=0.0)
        vt = tl.load(v + kv_off[:, None] + d[None, :], mask=um[:, None], other=0.0)
        s = tl.dot(qt, tl.trans(kt)) * scale_log2
        member = (((bits[None, :] >> i[:, None]) & 1) != 0) & um[None, :]
        s = tl.where(member, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(o + row_off[:, None] + d[None, :], (acc / l_safe[:, None]).to(o.dtype.element_ty),
             mask=rvalid[:, None])
    tl.store(lse + head_row, m_i + tl.log2(l_safe), mask=rvalid)


@triton.jit
def filter_probe(q_idx, w, k_idx, start_ptr, blk_ptr, tau_ptr, cnt_ptr,
                 cand_s_ptr, cand_p_ptr, T, NBT, CAP,
                 HI: tl.constexpr, DI: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr,
                 MODE: tl.constexpr):
    # MODE 0 as the kernel; 1 count only (no candidate append); 2 scores only (no compare)
    p = tl.program_id(0)
    bb, i, t, tvalid, row, start = tk._block_rows(blk_ptr, start_ptr, p, T, NBT, BT)
    tau = tl.load(tau_ptr + p * BT + i)
    active = tvalid & (tau < float("inf"))
    lo = tl.min(tl.where(active, start, T), axis=0)
    hi = tl.max(tl.where(active, t + 1, 0), axis=0)
    lo = (lo // BS) * BS
    dd = tl.arange(0, DI)
    cnt = tl.zeros([BT], dtype=tl.int32)
    acc = tl.zeros([BT, BS], dtype=tl.float32)
    cand_row = (p * BT + i).to(tl.int64) * CAP
    for s0 in range(lo, hi, BS):
        s = s0 + tl.arange(0, BS)
        smask = s < hi
        kt = tl.load(k_idx + ((bb * T + s).to(tl.int64) * DI)[:, None] + dd[None, :],
                     mask=smask[:, None], other=0.0)
        score = tl.zeros([BT, BS], dtype=tl.float32)
        for j in tl.static_range(HI):
            qj = tl.load(q_idx + (row * HI + j)[:, None] * DI + dd[None, :],
                         mask=tvalid[:, None], other=0.0)
            wj = tl.load(w + row * HI + j, mask=tvalid, other=0.0).to(tl.float32)
            u = tl.dot(qj, tl.trans(kt))
            score += tl.maximum(u, 0.0) * wj[:, None]
        if MODE == 2:
            acc += score
        else:
            score = tl.where(score == 0.0, 0.0, score)
            elig = active[:, None] & (s[None, :] <= t[:, None]) & (s[None, :] >= start[:, None])
            keep = elig & (score >= tau[:, None])
            kc = keep.to(tl.int32)
            if MODE == 3:
                dest = cnt[:, None] + tl.cumsum(kc, axis=1) - 1
                smask2 = keep & (dest < CAP)
                b = score.to(tl.int32, bitcast=True)
                key = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
                packed = (key.to(tl.int64) << 32) | (s[None, :] + 0 * dest).to(tl.int64)
                tl.store(cand_p_ptr + cand_row[:, None] + dest, packed, mask=smask2)
            if MODE == 0:
                dest = cnt[:, None] + tl.cumsum(kc, axis=1) - 1
                smask2 = keep & (dest < CAP)
                tl.store(cand_s_ptr + cand_row[:, None] + dest, score, mask=smask2)
                tl.store(cand_p_ptr + cand_row[:, None] + dest, s[None, :] + 0 * dest, mask=smask2)
            cnt += tl.sum(kc, axis=1)
    if MODE == 2:
        cnt += (tl.sum(acc, axis=1) == 12345.0).to(tl.int32)
    tl.store(cnt_ptr + p * BT + i, cnt)


def bwd_launcher(q, k, v, o, do, lse, plan, scale, L):
    """(launch, dk32, dv32): launch(mode, bs, warps, order=0) runs bwd_probe over `plan` (its
    block_q) into the fp32 dk32 / dv32 buffers it returns; WRAP per mode as the docstring says."""
    NB = plan.num_blocks
    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv32 = torch.zeros(v.shape, dtype=torch.float32, device=k.device)
    dq = torch.empty_like(q)

    def launch(mode, bs, warps, order=0):
        grid = (HKV_, NB) if order == 1 else (NB, HKV_)
        bwd_probe[grid](q, k, v, o, do, lse, dq, dk32, dv32, plan.offsets_N1, plan.pos_U,
                        plan.bits_U, L, plan.num_blocks_t, NB, scale, HQ=32, HKV=4, G=8, GP=8,
                        D=128, BQ=plan.block_q, BS=bs, MODE=mode, ORDER=order,
                        WRAP={5: 16384, 6: 1024}.get(mode, 4096), num_warps=warps, num_stages=3)
    return launch, dk32, dv32


def bwd_variants(q, k, v, o, do, lse, plan, scale, L, res, rec):
    # --- attention backward variants ---------------------------------------------------------
    launch, dk32, dv32 = bwd_launcher(q, k, v, o, do, lse, plan, scale, L)
    res["red_check"] = {}
    ref = None
    for mode in (0, 7, 8):  # the red variants must give the atomics' dk / dv (up to fp32 order)
        try:
            dk32.zero_(), dv32.zero_()
            launch(mode, 32, 4)
            if ref is None:
                ref = (dk32.clone(), dv32.clone())
            else:
                res["red_check"][mode] = [((a - b).norm() / b.norm()).item()
                                          for a, b in zip((dk32, dv32), ref)]
        except Exception as e:
            res["red_check"][mode] = f"{type(e).__name__}: {str(e)[:300]}"
    print("red_check", res["red_check"], flush=True)
    del ref
    variants = ((0, 0, 32, 4), (7, 0, 32, 4), (8, 0, 32, 4), (3, 0, 32, 4), (2, 0, 32, 4),
                (9, 0, 32, 4), (10, 0, 32, 4), (11, 0, 32, 4), (4, 0, 32, 4), (0, 0, 128, 8),
                (1, 0, 128, 4), (3, 0, 128, 8), (4, 0, 128, 8), (5, 0, 128, 8), (6, 0, 64, 4),
                (0, 1, 128, 8), (0, 2, 128, 8))
    only = os.environ.get("PROBE_BWD_MODES")  # e.g. "0,3,9,10": those modes at 32-key tiles
    if only:
        keep = {int(m) for m in only.split(",")}
        variants = [vr for vr in variants if vr[0] in keep and vr[2] == 32 and vr[1] == 0]
    for mode, order, bs, warps in variants:
        rec(f"bwd_probe_mode{mode}_order{order}_BS{bs}_w{warps}",
            lambda mode=mode, order=order, bs=bs, warps=warps: launch(mode, bs, warps, order))


def bwd_block8(q, k, v, do, idx, plan4, o4, lse4, scale, L, res, rec):
    """The backward over 8-token union blocks (64 query rows per program): what the fewer (block,
    key) entries (757 per token instead of 991 at 128K) buy when the products double. The shipped
    4-token backward (mode 0, 32-key tiles, 4 warps) is timed first in the same run as the baseline."""
    launch4, _, _ = bwd_launcher(q, k, v, o4, do, lse4, plan4, scale, L)
    rec("bwd_probe_block4_mode0_BS32_w4", lambda: launch4(0, 32, 4))
    plan = build_sparse_plan(idx, 8)
    res["union_per_block8"] = plan.mean_union()
    rec("plan_block8", lambda: build_sparse_plan(idx, 8))
    o, lse = sa.sparse_attn_fwd(q, k, v, plan, scale)
    launch, _, _ = bwd_launcher(q, k, v, o, do, lse, plan, scale, L)
    for mode in (0, 3, 9):
        for bs, warps in ((32, 8), (16, 8)):
            rec(f"bwd_probe_block8_mode{mode}_BS{bs}_w{warps}",
                lambda mode=mode, bs=bs, warps=warps: launch(mode, bs, warps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=131072)
    ap.add_argument("--out", default="probe.json")
    args = ap.parse_args()
    require_gpus(__file__)
    L = args.L
    x = make_inputs(L)
    qi, w, ki = (x[n].detach() for n in ("q_idx", "w", "k_idx"))
    q, k, v, do = (x[n].detach() for n in ("q", "k", "v", "do"))
    scale = D ** -0.5
    res = {"L": L}

    def rec(name, fn):
        try:
            fn()
            torch.cuda.synchronize()
            ms = timed(fn)
            res[name] = ms
            print(f"{name:40s} {ms:9.2f} ms", flush=True)
        except Exception as e:
            res[name] = f"{type(e).__name__}: {str(e)[:300]}"
            print(name, "FAILED", res[name][:200], flush=True)
            traceback.print_exc()
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    if os.environ.get("PROBE_ONLY_BWD"):
        idx = tk.dsa_topk_triton(qi, w, ki, TOPK)
        plan = build_sparse_plan(idx, 4)
        o, lse = sa.sparse_attn_fwd(q, k, v, plan, scale)
        if os.environ.get("PROBE_BWD_BLOCK8"):
            return bwd_block8(q, k, v, do, idx, plan, o, lse, scale, L, res, rec)
        return bwd_variants(q, k, v, o, do, lse, plan, scale, L, res, rec)
    rec("topk_total", lambda: tk.dsa_topk_triton(qi, w, ki, TOPK))
    idx = tk.dsa_topk_triton(qi, w, ki, TOPK)
    plan = build_sparse_plan(idx, 4)
    res["union_per_block"] = plan.mean_union()
    o, lse = sa.sparse_attn_fwd(q, k, v, plan, scale)
    start = row_doc_start(1, L, None, q.device)
    rec("plan", lambda: build_sparse_plan(idx, 4))
    rec("attn_fwd", lambda: sa.sparse_attn_fwd(q, k, v, plan, scale))
    rec("attn_bwd", lambda: sa.sparse_attn_bwd(q, k, v, o, do, lse, plan, scale))
    rec("loss_fwd", lambda: il.indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale,
                                              keep_psum=True))
    kl, lse_i, z, psum = il.indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale,
                                           keep_psum=True)
    gscale = torch.full((1,), 1.0 / L, device=q.device)
    rec("loss_bwd", lambda: il.indexer_kl_bwd(qi, w, ki, q, k, lse, plan, scale, lse_i,
                                              z, gscale, psum=psum))

    # --- top-k pieces: sample / filter / select, one chunk layout as dsa_topk_triton ----------
    cfg = tk._config(q.device)
    BT = cfg["BT"]
    K = TOPK
    cap = tk.default_cap(K)
    M = min(2048, cap // 2)
    NBT = triton.cdiv(L, BT)
    blks = torch.arange(NBT, dtype=torch.int32, device=q.device)
    nslot = NBT * BT
    tau = torch.empty(nslot, dtype=torch.float32, device=q.device)
    scratch = torch.empty(nslot, pow2(M), dtype=torch.float32, device=q.device)
    cnt = torch.empty(nslot, dtype=torch.int32, device=q.device)
    nb_c = 512  # filter over the first chunk-sized group only for memory: scale the time
    chunks = [blks[c:c + nb_c] for c in range(0, NBT, nb_c)]
    cand_s = torch.empty(nb_c * BT, cap, dtype=torch.float32, device=q.device)
    cand_p = torch.empty(nb_c * BT, cap, dtype=torch.int32, device=q.device)
    prec = dot_precision(qi.dtype)

    def sample():
        tk.topk_fwd_kernel_sample[(NBT,)](qi, w, ki, start, blks, scratch, L, NBT, cap, M, HI=16,
                                          DI=64, DIP=64, BT=BT, SB=cfg["SB"], MP=pow2(M),
                                          DOT_PREC=prec, num_warps=cfg["warps_sample"])
        tk.topk_fwd_kernel_tau[(nslot,)](start, blks, tau, scratch, nslot, L, NBT, K, cap, M,
                                         (K + cap) // 2, BT=BT, MP=pow2(M), R=1,
                                         num_warps=cfg["warps_select"])
    rec("topk_sample", sample)
    sample()

    def filt(mode, bt=BT, bs=cfg["BS"], warps=cfg["warps_filter"]):
        def f():
            nbt = triton.cdiv(L, bt)
            bl = torch.arange(nbt, dtype=torch.int32, device=q.device)
            tau_b = tau if bt == BT else torch.full((nbt * bt,), float("-inf"), device=q.device)
            cnt_b = torch.empty(nbt * bt, dtype=torch.int32, device=q.device)
            filter_probe[(nbt,)](qi, w, ki, start, bl, tau_b, cnt_b, cand_s, cand_p, L, nbt, 0,
                                 HI=16, DI=64, BT=bt, BS=bs, MODE=mode, num_warps=warps)
        return f

    def filt_real():
        for c in chunks:
            tk.topk_fwd_kernel_filter[(c.numel(),)](
                qi, w, ki, start, c, tau[c[0] * BT:], cnt[c[0] * BT:], cand_s, cand_p, L, NBT, cap,
                HI=16, DI=64, DIP=64, BT=BT, BS=cfg["BS"], DOT_PREC=prec,
                num_warps=cfg["warps_filter"])
    rec("topk_filter_real_chunked", filt_real)
    rec("filter_probe_count_only", filt(1))
    cand_p64 = torch.empty(nb_c * BT, cap, dtype=torch.int64, device=q.device)

    def filt_full(mode, bt, bs, warps, capx):
        def f():
            nbt = triton.cdiv(L, bt)
            for c0 in range(0, nbt, nb_c * BT // bt):
                bl = torch.arange(c0, min(nbt, c0 + nb_c * BT // bt), dtype=torch.int32,
                                  device=q.device)
                filter_probe[(bl.numel(),)](qi, w, ki, start, bl, tau[c0 * bt:], cnt[c0 * bt:],
                                            cand_s, cand_p64 if mode == 3 else cand_p, L, nbt,
                                            capx, HI=16, DI=64, BT=bt, BS=bs, MODE=mode,
                                            num_warps=warps)
        return f
    for mode, bt, bs, wp in ((0, 16, 64, 4), (3, 16, 64, 4), (0, 64, 128, 8), (3, 64, 128, 8),
                             (0, 64, 64, 8), (3, 64, 64, 8), (0, 32, 128, 8), (0, 64, 64, 4)):
        rec(f"filter_full_mode{mode}_BT{bt}_BS{bs}_w{wp}", filt_full(mode, bt, bs, wp, cap))
    rec("filter_full_mode3_BT64_BS128_w8_cap4096", filt_full(3, 64, 128, 8, 4096))
    rec("filter_probe_scores_only", filt(2))
    for bt, bs, wp in ((64, 128, 8), (128, 64, 8), (128, 128, 8), (64, 256, 8)):
        rec(f"filter_probe_scores_only_BT{bt}_BS{bs}_w{wp}", filt(2, bt, bs, wp))

    bwd_variants(q, k, v, o, do, lse, plan, scale, L, res, rec)
    NB = plan.num_blocks
    ob = torch.empty_like(q)
    lb = torch.empty_like(lse)
    for order, contig in ((0, 0), (1, 0), (2, 0), (0, 1)):
        grid = (HKV_, NB) if order == 1 else (NB, HKV_)
        rec(f"fwd_probe_order{order}_contig{contig}", lambda order=order, contig=contig, grid=grid: fwd_probe[grid](
            q, k, v, ob, lb, plan.offsets_N1, plan.pos_U, plan.bits_U, L, plan.num_blocks_t, NB,
            scale * 1.4426950408889634, HQ=32, HKV=4, G=8, GP=8, D=128, BQ=4, BS=64, ORDER=order,
            CONTIG=contig, num_warps=4, num_stages=3))
    print(json.dumps(res, indent=1))


HKV_ = 4

if __name__ == "__main__":
    main()
