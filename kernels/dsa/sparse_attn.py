"""Sparse GQA attention over the DSA-selected keys (Triton forward and backward).

Shape legend: B batch, T tokens, Hq query heads, Hkv KV heads, G = Hq / Hkv query heads per group,
GP = next_pow2(G), D head dim (DP = next_pow2(D)), BQ tokens per block (plan.block_q),
BM = BQ * GP query rows per program, BS union keys per tile.

One program per (query block, KV group). It loads the group's query heads of the BQ tokens as one
[BM, D] tile (row r = token r // GP, head r % GP), walks the block's union of selected keys
(plan.py) in tiles of BS, gathers each key/value row of the group once, and masks (row, key)
pairs whose token did not select the key. Each head keeps its own online softmax.

Forward stores o [B, T, Hq, D] and lse [B, T, Hq] (fp32, natural log). Backward recomputes the
probabilities from lse, computes dq in registers (no atomics: a token belongs to one block), and
scatter-adds dk / dv per union key with fp32 atomics into [B, T, Hkv, D] buffers: one atomic per
(block, distinct key, group) rather than per (token, key). Summation order of those atomics is not
fixed, so dk / dv may differ in the last bits between runs (dq, o, lse are deterministic). With torch's
deterministic algorithms on (train.deterministic), the kernel's DET variant adds the same rows as int64
fixed-point values with integer atomics instead (exact sums, in any order: common.fixed_point_scales).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (LOG2E, dot_precision, fixed_point_scales, from_fixed_point, interpreting, maxnreg, pow2,
                     to_fixed_point)
from .plan import SparsePlan


@triton.jit(do_not_specialize=["T", "NBT"])
def sparse_attn_fwd_kernel_union(q, k, v, o, lse, offsets, upos, ubits, T, NBT, scale_log2,
                                 HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                                 GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                                 BQ: tl.constexpr, BS: tl.constexpr, DOT_PREC: tl.constexpr):
    # 1-D grid with the KV groups of a block adjacent: their K / V rows of a position are adjacent
    # in memory (10.6 vs 11.2 ms at 32K, 53.4 vs 53.7 at 128K on an H200, the same run; the
    # backward is the other way round, see sparse_attn_bwd)
    pid = tl.program_id(0) // HKV
    g = tl.program_id(0) % HKV
    bb = pid // NBT
    BM: tl.constexpr = BQ * GP
    r = tl.arange(0, BM)
    i = r // GP
    h = r % GP
    t = (pid % NBT) * BQ + i
    rvalid = (h < G) & (t < T)
    d = tl.arange(0, DP)
    dmask = d < D
    row_off = ((bb * T + tl.minimum(t, T - 1)).to(tl.int64) * HQ + g * G + h) * D
    qt = tl.load(q + row_off[:, None] + d[None, :], mask=rvalid[:, None] & dmask[None, :],
                 other=0.0)
    u_lo = tl.load(offsets + pid)
    u_hi = tl.load(offsets + pid + 1)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, DP], dtype=tl.float32)
    for u0 in range(u_lo, u_hi, BS):
        uu = u0 + tl.arange(0, BS)
        um = uu < u_hi
        pos = tl.load(upos + uu, mask=um, other=0)
        bits = tl.load(ubits + uu, mask=um, other=0)
        kv_off = ((bb * T + pos).to(tl.int64) * HKV + g) * D
        kvmask = um[:, None] & dmask[None, :]
        kt = tl.load(k + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        vt = tl.load(v + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PREC) * scale_log2
        member = (((bits[None, :] >> i[:, None]) & 1) != 0) & um[None, :]
        s = tl.where(member, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(o + row_off[:, None] + d[None, :], out.to(o.dtype.element_ty),
             mask=rvalid[:, None] & dmask[None, :])
    lse_r = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    lse_off = (bb * T + tl.minimum(t, T - 1)).to(tl.int64) * HQ + g * G + h
    tl.store(lse + lse_off, lse_r, mask=rvalid)


@triton.jit(do_not_specialize=["T", "NBT", "PID0", "U0"])
def sparse_attn_bwd_kernel_union(q, k, v, o, do, lse, dq, dk, dv, offsets, upos, ubits, psum, fix, T, NBT,
                                 PID0, U0, scale, HQ: tl.constexpr, HKV: tl.constexpr,
                                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                                 DP: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr,
                                 PSUM: tl.constexpr, DET: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (p, g) handles block PID0 + p, KV group g. PSUM: also add the group's probabilities,
    summed over its query heads, into psum [U - U0, BQ] (fp32, entry u at row u - U0; zeroed by the
    caller): the sparse indexer KL's target, taken from the P this kernel recomputes anyway
    (kernels/dsa/fused.py). DET (deterministic): no fp32 atomics; dk, dv and psum are int64 and take
    each contribution x as round(x * s) (integer atomics: exact sums, whatever their order), s = fix[0],
    fix[1], fix[2] (fp32 powers of two, common.fixed_point_scales)."""
    pid = PID0 + tl.program_id(0)
    g = tl.program_id(1)
    bb = pid // NBT
    BM: tl.constexpr = BQ * GP
    r = tl.arange(0, BM)
    i = r // GP
    h = r % GP
    t = (pid % NBT) * BQ + i
    rvalid = (h < G) & (t < T)
    d = tl.arange(0, DP)
    dmask = d < D
    rmask = rvalid[:, None] & dmask[None, :]
    head_row = (bb * T + tl.minimum(t, T - 1)).to(tl.int64) * HQ + g * G + h
    row_off = head_row * D
    qt = tl.load(q + row_off[:, None] + d[None, :], mask=rmask, other=0.0)
    dot_ = tl.load(do + row_off[:, None] + d[None, :], mask=rmask, other=0.0)
    ot = tl.load(o + row_off[:, None] + d[None, :], mask=rmask, other=0.0)
    delta = tl.sum(ot.to(tl.float32) * dot_.to(tl.float32), axis=1)
    lse2 = tl.load(lse + head_row, mask=rvalid, other=float("inf")) * 1.4426950408889634
    scale_log2 = scale * 1.4426950408889634
    u_lo = tl.load(offsets + pid)
    u_hi = tl.load(offsets + pid + 1)
    dq_acc = tl.zeros([BM, DP], dtype=tl.float32)
    if DET:
        fix_k = tl.load(fix)
        fix_v = tl.load(fix + 1)
        fix_p = tl.load(fix + 2)
    for u0 in range(u_lo, u_hi, BS):
        uu = u0 + tl.arange(0, BS)
        um = uu < u_hi
        pos = tl.load(upos + uu, mask=um, other=0)
        bits = tl.load(ubits + uu, mask=um, other=0)
        kv_off = ((bb * T + pos).to(tl.int64) * HKV + g) * D
        kvmask = um[:, None] & dmask[None, :]
        kt = tl.load(k + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        vt = tl.load(v + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(qt, tl.trans(kt), input_precision=DOT_PREC) * scale_log2
        member = (((bits[None, :] >> i[:, None]) & 1) != 0) & um[None, :] & rvalid[:, None]
        p = tl.where(member, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(dot_, tl.trans(vt), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq_acc += tl.dot(ds.to(kt.dtype), kt, input_precision=DOT_PREC)
        dv_t = tl.dot(tl.trans(p.to(dot_.dtype)), dot_, input_precision=DOT_PREC)
        dk_t = tl.dot(tl.trans(ds.to(qt.dtype)), qt, input_precision=DOT_PREC) * scale
        # DET: the same values as int64 fixed point (constexpr: the buffers' type), each converted as it is added
        tl.atomic_add(dv + kv_off[:, None] + d[None, :], to_fixed_point(dv_t, fix_v) if DET else dv_t, mask=kvmask,
                      sem="relaxed")
        tl.atomic_add(dk + kv_off[:, None] + d[None, :], to_fixed_point(dk_t, fix_k) if DET else dk_t, mask=kvmask,
                      sem="relaxed")
        if PSUM:
            pg = tl.sum(tl.reshape(p, [BQ, GP, BS]), axis=1)
            tl.atomic_add(psum + (uu - U0).to(tl.int64)[None, :] * BQ + tl.arange(0, BQ)[:, None],
                          to_fixed_point(pg, fix_p) if DET else pg, mask=um[None, :], sem="relaxed")
    tl.store(dq + row_off[:, None] + d[None, :], (dq_acc * scale).to(dq.dtype.element_ty),
             mask=rmask)


def _config(device: torch.device, BM: int, D: int, elem_bytes: int = 2,
            span: int | None = None) -> dict:
    """Interpreter: wide tiles (cost is per op). GPU (sm_90, D = 128, BM = 32 rows), timed by
    bench/sweep_dsa.py at 128K on an H200: forward 128-key tiles with 4 warps 54 ms (64 keys / 8
    warps: 86, 64 / 4: 72, 256 / 8: 72; 8 warps at 128 keys: 99); backward 32-key tiles with 4
    warps 222 ms (128 keys / 8 warps: 275, 64 / 4: 292, 128 / 4 spills: 776). fp32 inputs keep 64
    keys forward (128 fp32 K and V rows per stage would exceed the 227 KB of shared memory). 64-row
    blocks (8 tokens) keep 8 warps. 16-byte vector reductions (red.global.add.v4.f32) for dk / dv
    measured no faster than scalar fp32 atomics (371 vs 364 ms); the backward is bound by the dk /
    dv reductions (275 ms with them, 113 ms with the same products left unwritten, 229 ms with them
    folded into an L2-resident band of 4K keys: bench/probe_dsa.py); at the shipped tiles the
    reductions alone, without gathers or products, take 196 of the backward's 222 ms.
    The backward runs at 255 registers (two programs per SM); capped at 168 (three per SM, 64 bytes
    of spills) it is faster up to 64K tokens and slower at 128K (bench/sweep_dsa.py --only attn_bwd,
    one run each, against the uncapped kernel in the same run: 6.79 vs 7.43-7.47 ms at 8K, 16.23 vs
    17.77-17.79 at 16K, 36.98 vs 40.50-40.59 at 32K, 86.05 vs 92.55-92.70 at 64K, 231.88 vs
    222.11-222.17 at 128K; 128 registers: 51.7 / 320.7 at 32K / 128K), so the cap applies to
    span <= 64K, where more programs hide the gathers' latency; at 96K both take 155-157 ms, and at
    128K the reductions bound it and a third program per SM only adds reductions in flight. `span`
    is the longest packed document (plan.max_doc_len), not the packed length: 128K tokens packed as
    8K / 16K / 32K / 64K documents take 106.8 / 129.7 / 148.2 / 173.7 ms capped against 117.3 /
    142.1 / 162.8 / 186.6 uncapped (--only attn_bwd_packed). The forward gains nothing from a cap
    (its 82 KB of shared memory already allow only two programs; 64-key tiles at 128 registers:
    55.0 vs 52.3 ms at 128K, 10.7 vs 10.3 at 32K)."""
    if interpreting() or device.type != "cuda":
        return dict(BS_fwd=128, BS_bwd=128, warps_fwd=4, warps_bwd=4, stages_fwd=1, stages_bwd=1,
                    maxnreg_bwd=None)
    small = BM * pow2(D, 16) <= 32 * 128
    # forward pipeline stages with the group-minor grid: 2 stages 53.5 / 10.3 ms at 128K / 32K against
    # 53.9-54.2 / 10.6 for 3 and 53.8 / 10.6 for 4 (one run); the backward 3 (4: same, 5: 232.7 vs 222.3)
    return dict(BS_fwd=128 if elem_bytes <= 2 else 64, BS_bwd=32, warps_fwd=4 if small else 8,
                warps_bwd=4 if small else 8, stages_fwd=2, stages_bwd=3,
                maxnreg_bwd=(168 if small and elem_bytes <= 2 and span is not None
                             and span <= 65536 else None))  # measured for bf16 only


def sparse_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SparsePlan,
                    scale: float, o: torch.Tensor | None = None,
                    lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, T, Hq, D] and lse [B, T, Hq]; `o` / `lse` may be given (tests pass NaN-filled ones)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    GP, DP = pow2(G), pow2(D, 16)
    BQ = plan.block_q
    cfg = _config(q.device, BQ * GP, D)
    o = torch.empty_like(q) if o is None else o
    lse = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device) if lse is None else lse
    sparse_attn_fwd_kernel_union[(plan.num_blocks * HKV,)](
        q, k, v, o, lse, plan.offsets_N1, plan.pos_U, plan.bits_U, T, plan.num_blocks_t,
        scale * LOG2E, HQ=HQ, HKV=HKV, G=G, GP=GP, D=D, DP=DP, BQ=BQ, BS=cfg["BS_fwd"],
        DOT_PREC=dot_precision(q.dtype), num_warps=cfg["warps_fwd"], num_stages=cfg["stages_fwd"])
    return o, lse


def attn_bwd_fixed_point_scales(q, k, v, o, do, scale: float) -> torch.Tensor:
    """The deterministic backward's fixed-point scales [dk, dv, P] (common.fixed_point_scales), from bounds on the
    sum of |contributions| to any one element. Row r = (token, query head), s a key of its group: dv[s] += P[r,s]
    dO[r]; dk[s] += scale P[r,s] (dO[r].v[s] - dO[r].o[r]) q[r]; P (fused.py) adds P[r,s] over a token's heads.
    With sum_s P[r,s] <= 1, |dO.v| <= |dO|_1 max_s |v_s|_inf and |dO.o| <= |dO|_1 |o|_inf the sums over every key
    and row bound each element: dv: sum_r |dO_r|_inf; dk: scale * sum_r |q_r|_inf |dO_r|_1 (max |v|_inf +
    |o_r|_inf); P: Hq. (1- and inf-norms: no squares, which underflow fp32 for gradients near 1e-20.) k enters as
    0 * max |k|, so a NaN or inf in any input makes the scales, and the sums, NaN. Norms in fp32 without fp32
    copies of the inputs; torch's reductions, deterministic run to run."""
    f32, norm, inf = torch.float32, torch.linalg.vector_norm, float("inf")
    do_1 = norm(do, 1, dim=-1, dtype=f32)
    v_inf = norm(v, inf, dtype=f32)
    bound_k = scale * (norm(q, inf, dim=-1, dtype=f32) * do_1 * (v_inf + norm(o, inf, dim=-1, dtype=f32))).sum()
    bound_v = norm(do, inf, dim=-1, dtype=f32).sum()
    poison = 0.0 * norm(k, inf, dtype=f32)
    return fixed_point_scales([bound_k + poison, bound_v + poison, float(q.shape[2]) + poison], q.device)


def sparse_attn_bwd(q, k, v, o, do, lse, plan: SparsePlan, scale: float, dq: torch.Tensor | None = None):
    """(dq, dk, dv). dk / dv accumulate in fp32 buffers with fp32 atomics (keys nobody selected stay 0), or, when
    torch's deterministic algorithms are on (train.deterministic), in int64 fixed point with integer atomics (exact
    sums: the same bits whatever the order of the adds), then converted."""
    q, k, v, o, do, lse = (x.contiguous() for x in (q, k, v, o, do, lse))
    dq = torch.empty_like(q) if dq is None else dq
    fix = attn_bwd_fixed_point_scales(q, k, v, o, do, scale) if torch.are_deterministic_algorithms_enabled() else None
    acc = torch.float32 if fix is None else torch.int64
    dk_acc = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv_acc = torch.zeros(v.shape, dtype=acc, device=v.device)
    sparse_attn_bwd_blocks(q, k, v, o, do, lse, plan, scale, dq, dk_acc, dv_acc, fix=fix)
    if fix is None:
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype)
    return dq, from_fixed_point(dk_acc, fix[0:1], k.dtype), from_fixed_point(dv_acc, fix[1:2], v.dtype)


def sparse_attn_bwd_blocks(q, k, v, o, do, lse, plan: SparsePlan, scale: float, dq, dk_acc, dv_acc,
                           blocks: tuple[int, int] | None = None, psum: torch.Tensor | None = None,
                           u0: int = 0, fix: torch.Tensor | None = None) -> None:
    """The backward of the plan's blocks [b0, b1) (all when None): writes their rows of dq and adds into
    dk_acc / dv_acc; with `psum`, also adds each group's head-summed P of entry u, token i at
    psum[(u - u0) * BQ + i]. Inputs contiguous. fp32 sums with fp32 atomics; with `fix` (the deterministic
    backward: attn_bwd_fixed_point_scales) dk_acc, dv_acc and psum are int64 fixed point, added with integer
    atomics."""
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    G = HQ // HKV
    GP, DP = pow2(G), pow2(D, 16)
    BQ = plan.block_q
    b0, b1 = blocks if blocks is not None else (0, plan.num_blocks)
    if b1 <= b0:
        return
    # the key range a query reaches (the longest packed document; without it, every key row: under
    # context parallelism the query rows are a subset of the keys) decides the register cap
    cfg = _config(q.device, BQ * GP, D, q.element_size(), plan.max_doc_len or k.shape[1])
    # grid (blocks, groups): concurrent programs are adjacent blocks of one group, whose dk / dv
    # atomics hit the same keys at about the same time (the KV groups of a block adjacent instead,
    # as in the forward: 280 vs 222 ms at 128K, 45.6 vs 40.7 at 32K on an H200, the same run)
    sparse_attn_bwd_kernel_union[(b1 - b0, HKV)](
        q, k, v, o, do, lse, dq, dk_acc, dv_acc, plan.offsets_N1, plan.pos_U, plan.bits_U,
        dk_acc if psum is None else psum, dk_acc if fix is None else fix, T, plan.num_blocks_t, b0, u0, scale,
        HQ=HQ, HKV=HKV, G=G, GP=GP, D=D, DP=DP, BQ=BQ, BS=cfg["BS_bwd"], PSUM=psum is not None, DET=fix is not None,
        DOT_PREC=dot_precision(q.dtype), num_warps=cfg["warps_bwd"], num_stages=cfg["stages_bwd"],
        **maxnreg(cfg["maxnreg_bwd"]))


class SparseGQAAttentionFn(torch.autograd.Function):
    """o, lse = attention of each query head over its token's selected keys (plan)."""

    @staticmethod
    def forward(ctx, q, k, v, plan: SparsePlan, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = sparse_attn_fwd(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = sparse_attn_bwd(q, k, v, o, do.contiguous(), lse, ctx.plan, ctx.scale)
        return dq, dk, dv, None, None
