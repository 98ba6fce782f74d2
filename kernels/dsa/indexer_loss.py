"""Indexer KL losses for DSA training, streamed over key tiles (Triton forward and backward).

Shape legend: B batch, T tokens, Hq / Hkv attention heads (G = Hq / Hkv, GP = next_pow2(G)), D head
dim, HI / DI indexer heads / dim (HIP, DIP padded to powers of two), BQ tokens per program, BS keys
per tile. Per token t and key set S_t:

    I[t, s]  = sum_j w[t, j] relu(q_idx[t, j] . k_idx[s])                 (indexer scores)
    P[t, s]  = sum_h exp(scale q[t, h] . k[s, h // G] - lse[t, h])        (attention, head-summed)
    p[t, s]  = P[t, s] / Z[t],  Z[t] = sum_{s in S_t} P[t, s]            (target, L1-normalised)
    KL_t     = sum_s p log p - sum_s p (I - lse_I[t]),  lse_I = logsumexp_{s in S_t} I[t, s]
    loss     = mean_t KL_t;   dKL_t / dI[t, s] = softmax(I)[t, s] - p[t, s]

This module is the sparse stage's: S_t = the selected keys, walked through the block union plan
(plan.py), lse = the sparse attention's lse (p is then the sparse attention's head-summed
probabilities). The dense (warm-up) stage, S_t = every causal key of the token's document, tiles
tokens x keys instead: indexer_loss_dense.py.

Forward keeps per token only (KL, lse_I, Z) with online log-sum-exp; backward recomputes I and P
tile by tile. dq_idx and dw are written once per token (no atomics); dk_idx is scatter-added with
fp32 atomics (one per key tile and block), or, with torch's deterministic algorithms on, as int64 fixed-point
values with integer atomics (exact sums in any order; indexer_kl_bwd). The target is detached: q, k, lse get no
gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (LOG2E, dot_precision, fixed_point_scales, from_fixed_point, interpreting, pow2, relu_nan,
                     to_fixed_point)
from .plan import SparsePlan


@triton.jit
def _block_bounds(offsets, pid, t0, T, BQ: tl.constexpr):
    """The block's tokens, which are real, and its union entries [lo, hi)."""
    t = t0 + tl.arange(0, BQ)
    return t, t < T, tl.load(offsets + pid), tl.load(offsets + pid + 1)


@triton.jit
def _key_tile(upos, ubits, u0, hi, t, tvalid, BS: tl.constexpr):
    """Positions [BS] of the union entries from u0 and the membership mask [BQ, BS]."""
    uu = u0 + tl.arange(0, BS)
    um = uu < hi
    pos = tl.load(upos + uu, mask=um, other=0)
    bits = tl.load(ubits + uu, mask=um, other=0)
    i = tl.arange(0, t.shape[0])
    member = (((bits[None, :] >> i[:, None]) & 1) != 0) & um[None, :] & tvalid[:, None]
    return pos, um, member


@triton.jit
def _index_tile(qi, wv, k_idx, bb, T, pos, um, DI: tl.constexpr, DIP: tl.constexpr,
                BQ: tl.constexpr, HIP: tl.constexpr, DOT_PREC: tl.constexpr):
    """u [BQ*HIP, BS] per-head dots, gathered k_idx [BS, DIP], scores I [BQ, BS]."""
    dd = tl.arange(0, DIP)
    ki = tl.load(k_idx + ((bb * T + pos).to(tl.int64) * DI)[:, None] + dd[None, :],
                 mask=um[:, None] & (dd[None, :] < DI), other=0.0)
    u = tl.dot(qi, tl.trans(ki), input_precision=DOT_PREC)
    ru = relu_nan(u) * wv[:, None]
    score = tl.sum(tl.reshape(ru, [BQ, HIP, ru.shape[1]]), axis=1)
    return u, ki, score


@triton.jit
def _group_rows(q, lse, bb, T, t0, g, HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                D: tl.constexpr, DP: tl.constexpr, BQ: tl.constexpr):
    """KV group g's query tile [BQ*GP, DP] of the block (row = token * GP + head), its lse in
    log2 units, and which rows are real (head < G, token < T)."""
    rg = tl.arange(0, BQ * GP)
    tg = t0 + rg // GP
    h = rg % GP
    gvalid = (h < G) & (tg < T)
    d = tl.arange(0, DP)
    head_row = (bb * T + tl.minimum(tg, T - 1)).to(tl.int64) * HQ + g * G + h
    qg = tl.load(q + head_row[:, None] * D + d[None, :], mask=gvalid[:, None] & (d < D)[None, :],
                 other=0.0)
    lse2 = tl.load(lse + head_row, mask=gvalid, other=float("inf")) * 1.4426950408889634
    return qg, lse2, gvalid


@triton.jit
def _group_psum(qg, lse2, gvalid, k, bb, T, g, pos, um, scale_log2, HKV: tl.constexpr,
                GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BQ: tl.constexpr,
                BS: tl.constexpr, DOT_PREC: tl.constexpr):
    """[BQ, BS]: group g's attention probabilities exp(scale q.k - lse) at the tile's keys,
    summed over the group's query heads (each key row gathered once)."""
    d = tl.arange(0, DP)
    kg = tl.load(k + ((bb * T + pos).to(tl.int64) * HKV + g)[:, None] * D + d[None, :],
                 mask=um[:, None] & (d < D)[None, :], other=0.0)
    s = tl.dot(qg, tl.trans(kg), input_precision=DOT_PREC) * scale_log2
    pg = tl.where(gvalid[:, None], tl.exp2(s - lse2[:, None]), 0.0)
    return tl.sum(tl.reshape(pg, [BQ, GP, BS]), axis=1)


@triton.jit
def _psum_tile(q, k, lse, bb, T, t0, pos, um, scale_log2, HQ: tl.constexpr, HKV: tl.constexpr,
               G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
               BQ: tl.constexpr, BS: tl.constexpr, DOT_PREC: tl.constexpr):
    """P [BQ, BS]: attention probabilities exp(scale q.k - lse) summed over all query heads."""
    psum = tl.zeros([BQ, BS], dtype=tl.float32)
    for g in range(HKV):
        qg, lse2, gvalid = _group_rows(q, lse, bb, T, t0, g, HQ, G, GP, D, DP, BQ)
        psum += _group_psum(qg, lse2, gvalid, k, bb, T, g, pos, um, scale_log2, HKV, GP, D, DP,
                            BQ, BS, DOT_PREC)
    return psum


@triton.jit
def _load_indexer_rows(q_idx, w, bb, t0, T, HI: tl.constexpr, DI: tl.constexpr,
                       DIP: tl.constexpr, BQ: tl.constexpr, HIP: tl.constexpr):
    """Stacked indexer query rows of the block: row r = token r // HIP, head r % HIP."""
    ri = tl.arange(0, BQ * HIP)
    ti = t0 + ri // HIP
    j = ri % HIP
    ivalid = (j < HI) & (ti < T)
    irow = (bb * T + tl.minimum(ti, T - 1)).to(tl.int64) * HI + j
    dd = tl.arange(0, DIP)
    imask = ivalid[:, None] & (dd[None, :] < DI)
    qi = tl.load(q_idx + irow[:, None] * DI + dd[None, :], mask=imask, other=0.0)
    wv = tl.load(w + irow, mask=ivalid, other=0.0).to(tl.float32)
    return qi, wv, irow, imask, ivalid


@triton.jit
def _lse_step(m_i, l_i, score, member):
    """One key tile of the indexer's online logsumexp over the member keys: (m_i, l_i) updated."""
    sm = tl.where(member, score, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sm, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(sm - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _kl_sums(a_i, z_i, b_i, psum, score, member):
    """One key tile's share of sum P log P, sum P and sum P I (psum already zero off the members)."""
    a_i += tl.sum(tl.where(psum > 0.0, psum * tl.log(tl.where(psum > 0.0, psum, 1.0)), 0.0), axis=1)
    z_i += tl.sum(psum, axis=1)
    b_i += tl.sum(tl.where(member, psum * score, 0.0), axis=1)
    return a_i, z_i, b_i


@triton.jit
def _kl_value(a_i, z_i, b_i, lse_i):
    """Per-token KL(P / Z || softmax(I)) from the sums (0 for a token without keys), and Z made safe."""
    z_safe = tl.where(z_i > 0.0, z_i, 1.0)
    kl = a_i / z_safe - tl.log(z_safe) - b_i / z_safe + tl.where(z_i > 0.0, lse_i, 0.0)
    return kl, z_safe


@triton.jit(do_not_specialize=["T", "NBT", "g", "PID0", "U0"])
def indexer_loss_fwd_kernel_psum(q, k, lse, offsets, upos, ubits, psum_ptr, T, NBT, g, PID0, U0,
                                 scale_log2, HQ: tl.constexpr, HKV: tl.constexpr,
                                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                                 DP: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr,
                                 FIRST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Sparse stage, split forward: KV group g's share of the head-summed P of every (union entry,
    token) of one block, written (FIRST, g = 0) or added (g > 0) into psum_ptr [U, BQ] fp32. One
    launch per group, in group order, so the sums are deterministic and equal the fused kernel's
    order; the group's query tile and lse are loaded once and each key row is gathered once.
    Program p handles block PID0 + p; union entry u is at row u - U0 of psum_ptr (a chunk)."""
    pid = PID0 + tl.program_id(0)
    bb = pid // NBT
    t0 = (pid % NBT) * BQ
    t, tvalid, lo, hi = _block_bounds(offsets, pid, t0, T, BQ)
    i = tl.arange(0, BQ)
    qg, lse2, gvalid = _group_rows(q, lse, bb, T, t0, g, HQ, G, GP, D, DP, BQ)
    for u0 in range(lo, hi, BS):
        pos, um, member = _key_tile(upos, ubits, u0, hi, t, tvalid, BS)
        p = _group_psum(qg, lse2, gvalid, k, bb, T, g, pos, um, scale_log2, HKV, GP, D, DP, BQ,
                        BS, DOT_PREC)
        p = tl.where(member, p, 0.0)
        ptr = psum_ptr + (u0 + tl.arange(0, BS) - U0).to(tl.int64)[None, :] * BQ + i[:, None]
        if not FIRST:
            p = tl.load(ptr, mask=um[None, :], other=0.0) + p
        tl.store(ptr, p, mask=um[None, :])


@triton.jit(do_not_specialize=["T", "NBT", "PID0", "U0"])
def indexer_loss_fwd_kernel_kl(q, k, lse, q_idx, w, k_idx, offsets, upos, ubits,
                               kl_ptr, lse_i_ptr, z_ptr, psum_ptr, psum_in, T, NBT, PID0, U0,
                               scale_log2,
                               HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr,
                               GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                               HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr,
                               DIP: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr,
                               STORE_P: tl.constexpr, PSUM_IN: tl.constexpr,
                               DOT_PREC: tl.constexpr):
    """STORE_P: also write the head-summed P of every (union entry, token) to psum_ptr [U, BQ],
    so that the backward reads it instead of recomputing 4 QK^T per tile.
    PSUM_IN: read that P, fp32, from psum_in [U, BQ] (written by
    indexer_loss_fwd_kernel_psum, entry u at row u - U0) instead of computing it here.
    Program p handles block PID0 + p."""
    pid = PID0 + tl.program_id(0)
    bb = pid // NBT
    t0 = (pid % NBT) * BQ
    t, tvalid, lo, hi = _block_bounds(offsets, pid, t0, T, BQ)
    qi, wv, irow, imask, ivalid = _load_indexer_rows(q_idx, w, bb, t0, T, HI, DI, DIP, BQ, HIP)
    m_i = tl.full([BQ], float("-inf"), tl.float32)
    l_i = tl.zeros([BQ], dtype=tl.float32)
    a_i = tl.zeros([BQ], dtype=tl.float32)  # sum P log P
    z_i = tl.zeros([BQ], dtype=tl.float32)  # sum P
    b_i = tl.zeros([BQ], dtype=tl.float32)  # sum P I
    for u0 in range(lo, hi, BS):
        pos, um, member = _key_tile(upos, ubits, u0, hi, t, tvalid, BS)
        u, ki, score = _index_tile(qi, wv, k_idx, bb, T, pos, um, DI, DIP, BQ, HIP, DOT_PREC)
        uu = u0 + tl.arange(0, BS)
        if PSUM_IN:
            psum = tl.load(psum_in + (uu - U0).to(tl.int64)[None, :] * BQ
                           + tl.arange(0, BQ)[:, None],
                           mask=member, other=0.0)
        else:
            psum = _psum_tile(q, k, lse, bb, T, t0, pos, um, scale_log2, HQ, HKV, G, GP, D, DP,
                              BQ, BS, DOT_PREC)
        psum = tl.where(member, psum, 0.0)
        if STORE_P:
            tl.store(psum_ptr + uu.to(tl.int64)[None, :] * BQ + tl.arange(0, BQ)[:, None],
                     psum.to(psum_ptr.dtype.element_ty), mask=(uu < hi)[None, :])
        m_i, l_i = _lse_step(m_i, l_i, score, member)
        a_i, z_i, b_i = _kl_sums(a_i, z_i, b_i, psum, score, member)
    lse_i = m_i + tl.log(tl.where(l_i == 0.0, 1.0, l_i))
    kl, z_safe = _kl_value(a_i, z_i, b_i, lse_i)
    row = (bb * T + tl.minimum(t, T - 1)).to(tl.int64)
    tl.store(kl_ptr + row, kl, mask=tvalid)
    tl.store(lse_i_ptr + row, lse_i, mask=tvalid)
    tl.store(z_ptr + row, z_safe, mask=tvalid)


@triton.jit(do_not_specialize=["T", "NBT", "PID0", "U0"])
def indexer_loss_bwd_kernel_kl(q, k, lse, q_idx, w, k_idx, offsets, upos, ubits,
                               lse_i_ptr, z_ptr, psum_ptr, gscale_ptr, dq_idx, dw, dk_idx, fix,
                               T, NBT, PID0, U0, scale_log2, HQ: tl.constexpr, HKV: tl.constexpr,
                               G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                               DP: tl.constexpr, HI: tl.constexpr, HIP: tl.constexpr,
                               DI: tl.constexpr, DIP: tl.constexpr, BQ: tl.constexpr,
                               BS: tl.constexpr, LOAD_P: tl.constexpr, DET: tl.constexpr,
                               DOT_PREC: tl.constexpr):
    """LOAD_P: read the head-summed P (the forward's, or the attention backward's fp32 chunk:
    entry u at row u - U0) instead of recomputing it. Program p handles block PID0 + p.
    DET (deterministic): no fp32 atomics; dk_idx is int64 and takes each contribution x as round(x * fix[0])
    (integer atomics: exact sums in any order; kl_bwd_fixed_point_scale)."""
    pid = PID0 + tl.program_id(0)
    bb = pid // NBT
    t0 = (pid % NBT) * BQ
    t, tvalid, lo, hi = _block_bounds(offsets, pid, t0, T, BQ)
    qi, wv, irow, imask, ivalid = _load_indexer_rows(q_idx, w, bb, t0, T, HI, DI, DIP, BQ, HIP)
    row = (bb * T + tl.minimum(t, T - 1)).to(tl.int64)
    lse_i = tl.load(lse_i_ptr + row, mask=tvalid, other=0.0)
    z_i = tl.load(z_ptr + row, mask=tvalid, other=1.0)
    gscale = tl.load(gscale_ptr)  # d loss / d KL_t = grad_out / number of tokens
    if DET:
        fix_ki = tl.load(fix)
    dd = tl.arange(0, DIP)
    dqi = tl.zeros([BQ * HIP, DIP], dtype=tl.float32)
    dwv = tl.zeros([BQ * HIP], dtype=tl.float32)
    for u0 in range(lo, hi, BS):
        pos, um, member = _key_tile(upos, ubits, u0, hi, t, tvalid, BS)
        u, ki, score = _index_tile(qi, wv, k_idx, bb, T, pos, um, DI, DIP, BQ, HIP, DOT_PREC)
        if LOAD_P:
            uu = u0 + tl.arange(0, BS)
            psum = tl.load(psum_ptr + (uu - U0).to(tl.int64)[None, :] * BQ + tl.arange(0, BQ)[:, None],
                           mask=member, other=0.0).to(tl.float32)
        else:
            psum = _psum_tile(q, k, lse, bb, T, t0, pos, um, scale_log2, HQ, HKV, G, GP, D, DP,
                              BQ, BS, DOT_PREC)
        d_i = tl.exp(tl.where(member, score, float("-inf")) - lse_i[:, None]) - psum / z_i[:, None]
        d_i = tl.where(member, d_i, 0.0) * gscale
        d_rows = tl.reshape(tl.broadcast_to(d_i[:, None, :], [BQ, HIP, BS]), [BQ * HIP, BS])
        du = tl.where(u > 0.0, d_rows * wv[:, None], 0.0)
        dwv += tl.sum(relu_nan(u) * d_rows, axis=1)
        dqi += tl.dot(du.to(ki.dtype), ki, input_precision=DOT_PREC)
        dki = tl.dot(tl.trans(du.to(qi.dtype)), qi, input_precision=DOT_PREC)
        # DET: int64 fixed point (constexpr: the buffer's type)
        tl.atomic_add(dk_idx + ((bb * T + pos).to(tl.int64) * DI)[:, None] + dd[None, :],
                      to_fixed_point(dki, fix_ki) if DET else dki, mask=um[:, None] & (dd[None, :] < DI),
                      sem="relaxed")
    tl.store(dq_idx + irow[:, None] * DI + dd[None, :], dqi.to(dq_idx.dtype.element_ty), mask=imask)
    tl.store(dw + irow, dwv.to(dw.dtype.element_ty), mask=ivalid)


# the fp32 head-summed P of the sparse KL per chunk of union entries; parallel/memory.py counts it too
LOSS_CHUNK_BYTES = 256 << 20


def _config(device: torch.device) -> dict:
    """Interpreter: wide tiles (cost is per op). GPU (sm_90 at Hq 32 / Hkv 4 / D 128 / HI 16 /
    DI 64, 4 tokens per program), timed by bench/sweep_dsa.py at 128K on an H200: forward 128-key
    tiles with 4 warps 60 ms (64 / 4: 68, 256 / 8: 65, 32 / 8: 167); backward from the cached P,
    128-key tiles 26 ms (32: 29, 64: 35); the recomputing backward (timed on the sparse plan when the
    dense stage ran it too) 32-key tiles with 4 warps 97 ms (16 keys / 8 warps: 296); the backward from the
    cached P with 3 pipeline stages 23.7 ms (2: 26.2, 1: 26.8; 8 warps: 63.5). The split sparse forward
    (split_fwd): per-group P launches with 64-key tiles, 2 warps, 3 stages, then the KL kernel with
    64-key tiles / 4 warps: 44 ms at 256 MiB chunks (the fused kernel above: 60 ms; first split
    tiles 128 / 4 warps / 2 stages: 50 ms; chunks of 64 MiB 52 ms, 1 GiB 41.6 ms, kept at 256 MiB
    for memory)."""
    if interpreting() or device.type != "cuda":
        return dict(BS_fwd=128, BS_bwd=128, BS_bwd_p=128, warps=4, warps_bwd=4, stages=1,
                    split_fwd=True, BS_psum=128, warps_psum=4, BS_kl=128, warps_kl=4, stages_split=1,
                    chunk_bytes=LOSS_CHUNK_BYTES, stages_bwd_p=1)
    return dict(BS_fwd=128, BS_bwd=32, BS_bwd_p=128, warps=4, warps_bwd=4, stages=2, split_fwd=True,
                BS_psum=64, warps_psum=2, BS_kl=64, warps_kl=4, stages_split=3, chunk_bytes=LOSS_CHUNK_BYTES,
                stages_bwd_p=3)


def loss_block_q(num_q_heads: int, num_kv_heads: int, num_idx_heads: int) -> int:
    """Tokens per program: <= 64 stacked indexer rows and <= 32 attention rows per group."""
    gp = pow2(num_q_heads // num_kv_heads)
    return max(1, min(16, 64 // pow2(num_idx_heads), 32 // gp))


def _launch_meta(q_shape, k_shape, q_idx, plan: SparsePlan):
    B, T, HQ, D = q_shape
    HKV = k_shape[2]
    HI, DI = q_idx.shape[2], q_idx.shape[3]
    G = HQ // HKV
    BQ = plan.block_q
    return dict(HQ=HQ, HKV=HKV, G=G, GP=pow2(G), D=D, DP=pow2(D, 16), HI=HI, HIP=pow2(HI),
                DI=DI, DIP=pow2(DI, 16), BQ=BQ), B, T, triton.cdiv(T, BQ)


def _plan_args(plan: SparsePlan):
    return plan.offsets_N1, plan.pos_U, plan.bits_U


def psum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the cached head-summed P: fp32 for fp32 inputs (exact tests), else bf16 (half
    the memory; P in [0, Hq] keeps 8 significant bits, below the bf16 rounding of the inputs)."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def psum_chunks(plan: SparsePlan, chunk_bytes: int,
                value_bytes: int = 4) -> tuple[list[tuple[int, int, int, int]], int]:
    """Chunks (b0, b1, u0, u1) of the plan's blocks [b0, b1), entries [u0, u1), whose head-summed P fits
    `chunk_bytes` at `value_bytes` per value (fp32: 4; the deterministic backward's int64 sums and their fp32 copy:
    12), cut where the entry count crosses multiples of the budget (a block has at most BQ * K entries, so a chunk
    needs at most budget + that), and the widest chunk's entries. One host sync for the cut points."""
    nb, offs = plan.num_blocks, plan.offsets_N1
    n_u = plan.pos_U.numel()
    budget = max(1, chunk_bytes // (value_bytes * plan.block_q))
    cuts = [0, nb]
    if n_u > budget:
        targets = torch.arange(budget, n_u, budget, device=offs.device, dtype=offs.dtype)
        cuts[1:1] = torch.searchsorted(offs, targets, right=True).sub_(1).tolist()
    cuts = sorted(set(cuts))
    bounds = offs[torch.tensor(cuts, device=offs.device)].tolist()
    chunks = [(b0, b1, u0, u1) for b0, b1, u0, u1 in zip(cuts[:-1], cuts[1:], bounds[:-1], bounds[1:])]
    return chunks, max((u1 - u0 for *_, u0, u1 in chunks), default=0)


def indexer_kl_fwd(q_idx, w, k_idx, q, k, lse, plan: SparsePlan, scale: float, kl=None, lse_i=None,
                   z=None, keep_psum: bool = False, split: bool | None = None,
                   chunk_bytes: int | None = None):
    """Per-token KL [B*T], indexer lse_I [B*T] and target mass Z [B*T] (fp32) over each token's keys
    in the plan, plus (keep_psum) the head-summed P [U, BQ] for the backward, else None. Output
    buffers may be given (tests pass NaN-filled ones).

    split (None: the `_config` default): per chunk of blocks, one launch per KV group
    adds that group's head-summed P into an fp32 buffer (at most `chunk_bytes` + 4 * BQ * K bytes),
    then the KL kernel reads it; else one kernel computes all groups' P tile by tile, reloading
    each group's query tile per key tile. Same sums in the same order."""
    q_idx, w, k_idx, q, k, lse = (x.contiguous() for x in (q_idx, w, k_idx, q, k, lse))
    meta, B, T, nbt = _launch_meta(q.shape, k.shape, q_idx, plan)
    cfg = _config(q.device)
    kl = torch.empty(B * T, dtype=torch.float32, device=q.device) if kl is None else kl
    lse_i = torch.empty_like(kl) if lse_i is None else lse_i
    z = torch.empty_like(kl) if z is None else z
    psum = (torch.empty(plan.pos_U.numel() * plan.block_q, dtype=psum_dtype(q.dtype),
                        device=q.device) if keep_psum else None)
    split = cfg["split_fwd"] if split is None else split
    if not split:  # one kernel computes P tile by tile
        indexer_loss_fwd_kernel_kl[(B * nbt,)](
            q, k, lse, q_idx, w, k_idx, *_plan_args(plan), kl, lse_i, z, psum if keep_psum else kl, kl, T, nbt, 0, 0,
            scale * LOG2E, **meta, BS=cfg["BS_fwd"], STORE_P=keep_psum, PSUM_IN=False,
            DOT_PREC=dot_precision(q_idx.dtype), num_warps=cfg["warps"], num_stages=cfg["stages"])
        return kl, lse_i, z, psum
    chunks, width = psum_chunks(plan, chunk_bytes or cfg["chunk_bytes"])
    buf = torch.empty(max(1, width) * plan.block_q, dtype=torch.float32, device=q.device)
    pm = {n: meta[n] for n in ("HQ", "HKV", "G", "GP", "D", "DP", "BQ")}
    for b0, b1, u0, _ in chunks:
        for g in range(meta["HKV"]):
            indexer_loss_fwd_kernel_psum[(b1 - b0,)](
                q, k, lse, plan.offsets_N1, plan.pos_U, plan.bits_U, buf, T, nbt, g, b0, u0,
                scale * LOG2E, **pm, BS=cfg["BS_psum"], FIRST=g == 0,
                DOT_PREC=dot_precision(q.dtype), num_warps=cfg["warps_psum"],
                num_stages=cfg["stages_split"])
        kl_fwd_from_p(q_idx, w, k_idx, q.shape, k.shape, plan, scale, buf, (b0, b1), u0, kl, lse_i, z, keep=psum)
    return kl, lse_i, z, psum


def kl_fwd_from_p(q_idx, w, k_idx, q_shape, k_shape, plan: SparsePlan, scale: float, p_chunk, blocks, u0: int,
                  kl, lse_i, z, keep=None) -> None:
    """The KL forward kernel over the plan's blocks [b0, b1) with the head-summed P read from `p_chunk` (fp32,
    entry u at row u - u0): writes their tokens' KL, lse_I and Z; `keep`: also copies that P into the whole
    cached buffer (psum_dtype, entry u at row u). Shared by the split forward and kernels/dsa/fused.py."""
    meta, B, T, nbt = _launch_meta(q_shape, k_shape, q_idx, plan)
    cfg = _config(q_idx.device)
    b0, b1 = blocks
    # q, k, lse: pointer slots the PSUM_IN kernel never reads
    indexer_loss_fwd_kernel_kl[(b1 - b0,)](
        z, z, z, q_idx, w, k_idx, *_plan_args(plan), kl, lse_i, z, kl if keep is None else keep, p_chunk, T, nbt,
        b0, u0, scale * LOG2E, **meta, BS=cfg["BS_kl"], STORE_P=keep is not None, PSUM_IN=True,
        DOT_PREC=dot_precision(q_idx.dtype), num_warps=cfg["warps_kl"], num_stages=cfg["stages_split"])


def kl_bwd_fixed_point_scale(q_idx, w, k_idx, gscale: torch.Tensor) -> torch.Tensor:
    """The deterministic backward's fixed-point scale of dk_idx ([1], common.fixed_point_scales), from a bound on
    the sum of |contributions| to any one element: dk_idx[s] += sum_j d[t,s] w[t,j] [q_idx[t,j].k_idx[s] > 0]
    q_idx[t,j], d[t,s] = gscale (softmax(I)[t,s] - p[t,s]), two distributions over t's keys, so sum_s |d[t,s]| <=
    2 |gscale|: the bound is 2 |gscale| sum_(t,j) |w[t,j]| |q_idx[t,j]|_inf. k_idx enters as 0 * max |k_idx| (a NaN
    or inf there: a NaN scale, NaN sums)."""
    f32, norm, inf = torch.float32, torch.linalg.vector_norm, float("inf")
    bound = 2 * gscale.abs().reshape(()) * (w.abs().to(f32) * norm(q_idx, inf, dim=-1, dtype=f32)).sum()
    return fixed_point_scales([bound + 0.0 * norm(k_idx, inf, dtype=f32)], q_idx.device)


def indexer_kl_bwd(q_idx, w, k_idx, q, k, lse, plan: SparsePlan, scale: float, lse_i, z, gscale,
                   dq_idx=None, dw=None, psum=None):
    """(dq_idx, dw, dk_idx) for d loss / d KL_t = gscale (a 1-element fp32 tensor). `psum` (from
    indexer_kl_fwd(keep_psum=True)) replaces the recomputation of P from q, k and lse; q and k
    may then be shapes (torch.Size) instead of tensors, and lse None. dk_idx accumulates in fp32 with
    atomics, or, when torch's deterministic algorithms are on, in int64 fixed point with integer atomics (exact
    sums: the same bits whatever the order of the adds), then converted."""
    q_idx, w, k_idx = (x.contiguous() for x in (q_idx, w, k_idx))
    shapes = tuple(x.shape if torch.is_tensor(x) else x for x in (q, k))
    if psum is None:
        q, k, lse = q.contiguous(), k.contiguous(), lse.contiguous()
    dq_idx = torch.empty_like(q_idx) if dq_idx is None else dq_idx
    dw = torch.empty_like(w) if dw is None else dw
    fix = None
    if torch.are_deterministic_algorithms_enabled():
        # lse_I and Z (from the forward) carry a NaN of the target or the scores into the scale
        fix = kl_bwd_fixed_point_scale(q_idx, w, k_idx, gscale) + 0.0 * (lse_i.abs().amax() + z.abs().amax())
    dk_acc = torch.zeros(k_idx.shape, dtype=torch.float32 if fix is None else torch.int64, device=k_idx.device)
    kl_bwd_blocks(q_idx, w, k_idx, *shapes, plan, scale, lse_i, z, gscale, dq_idx, dw, dk_acc, psum=psum,
                  qkl=None if psum is not None else (q, k, lse), fix=fix)
    return dq_idx, dw, dk_acc.to(k_idx.dtype) if fix is None else from_fixed_point(dk_acc, fix, k_idx.dtype)


def kl_bwd_blocks(q_idx, w, k_idx, q_shape, k_shape, plan: SparsePlan, scale: float, lse_i, z, gscale, dq_idx, dw,
                  dk_acc, psum=None, qkl=None, blocks=None, u0: int = 0, fix: torch.Tensor | None = None) -> None:
    """The KL backward kernel over the plan's blocks [b0, b1) (all when None): writes their rows of dq_idx and dw
    and adds into dk_acc, with P read from `psum` (entry u at row u - u0) or, without it, recomputed from
    qkl = (q, k, lse). Shared by indexer_kl_bwd and kernels/dsa/fused.py. fp32 sums with fp32 atomics; with `fix`
    (the deterministic backward: kl_bwd_fixed_point_scale) dk_acc is int64 fixed point, added with integer
    atomics."""
    meta, B, T, nbt = _launch_meta(q_shape, k_shape, q_idx, plan)
    cfg = _config(q_idx.device)
    b0, b1 = blocks if blocks is not None else (0, B * nbt)
    if b1 <= b0:
        return
    load_p = psum is not None
    q, k, lse = (z, z, z) if load_p else qkl  # unused by the LOAD_P kernel: any tensor fills the pointer slots
    indexer_loss_bwd_kernel_kl[(b1 - b0,)](
        q, k, lse, q_idx, w, k_idx, *_plan_args(plan), lse_i, z, psum if load_p else z, gscale,
        dq_idx, dw, dk_acc, dk_acc if fix is None else fix, T, nbt, b0, u0, scale * LOG2E, **meta,
        BS=cfg["BS_bwd_p" if load_p else "BS_bwd"], LOAD_P=load_p, DET=fix is not None,
        DOT_PREC=dot_precision(q_idx.dtype), num_warps=cfg["warps" if load_p else "warps_bwd"],
        num_stages=cfg["stages_bwd_p" if load_p else "stages"])


class IndexerKLLossFn(torch.autograd.Function):
    """Mean over tokens of the sparse stage's KL(p || softmax(I)); gradients into q_idx, w, k_idx only.

    The forward caches the head-summed attention probabilities of the selected keys (`psum`, U * BQ
    entries, bf16 for 16-bit inputs), so the backward needs only the indexer's own dots and keeps
    nothing of q, k, lse.
    """

    @staticmethod
    def forward(ctx, q_idx, w, k_idx, q, k, lse, plan: SparsePlan, scale: float):
        q_idx, w, k_idx, q, k, lse = (x.contiguous() for x in (q_idx, w, k_idx, q, k, lse))
        kl, lse_i, z, psum = indexer_kl_fwd(q_idx, w, k_idx, q, k, lse, plan, scale, keep_psum=True)
        ctx.save_for_backward(q_idx, w, k_idx, lse_i, z, psum)
        ctx.shapes = (q.shape, k.shape)
        ctx.plan, ctx.scale = plan, scale
        return kl.sum() / kl.numel()

    @staticmethod
    def backward(ctx, grad):
        q_idx, w, k_idx, lse_i, z, psum = ctx.saved_tensors
        gscale = (grad.to(torch.float32) / lse_i.numel()).reshape(1).contiguous()
        q_shape, k_shape = ctx.shapes
        dq_idx, dw, dk_idx = indexer_kl_bwd(q_idx, w, k_idx, q_shape, k_shape, None, ctx.plan,
                                            ctx.scale, lse_i, z, gscale, psum=psum)
        return dq_idx, dw, dk_idx, None, None, None, None, None
