"""Triton forward/backward kernels of Kwai Summary Attention (KSA) on the interleaved layout.

Shapes legend (the wrapper flattens the batch into packed documents before the kernels run)
    T    interleaved tokens of all documents together (B*T for unpacked input)
    Hq   query heads, Hkv key/value heads, G = Hq // Hkv query heads per KV group, GP = next_pow2(G)
    D    head dim, BD = max(16, next_pow2(D))
    q_THD [T, Hq, D], k_THD / v_THD [T, Hkv, D], o_THD [T, Hq, D], lse_TH / delta_TH [T, Hq] fp32
    cu   [docs+1] int32 document boundaries in the interleaved sequence
    sched [entries, 3] int32 rows (doc, kind, first index); doc = -1 marks an idle program

Inside a document, token i is a summary slot iff i % (C+S) >= C. The kernels number the
document's text tokens 0..n_text-1 and its summary tokens 0..n_sum-1 ("text / summary index")
and map an index back to its interleaved row with integer arithmetic (`_text_row`, `_sum_row`),
so the far context is a dense, compacted run of summary keys and the near context a dense run of
text keys; no copy of the summaries into a separate tensor is needed. Each attending pair is an
interval per row (README.md, "Tiling"):

    text query t, chunk c = t // C     : text keys [max(c-W,0)*C, t+1), summary keys [0, max(c-W,0)*S)
    summary query s, chunk c = s // S  : text keys [c*C, c*C+C),         summary keys [c*S, s+1)
    text key k, chunk c = k // C       : text queries [k, (c+W+1)*C),    summary queries [c*S, (c+1)*S)
    summary key s, chunk c = s // S    : text queries [(c+W+1)*C, n_text), summary queries [s, (c+1)*S)

(query-side upper bounds clipped to n_text / n_sum). A tile loop over one interval family runs
masked tiles only where the rows' bounds differ (the edges) and unmasked tiles in between.

Programs: a query tile holds BLOCK_T tokens x the GP query heads of one KV group (rows =
BLOCK_T*GP), so every K/V tile is loaded once for the whole group. Forward and dq grids are
(query-block entries, Hkv); the dk/dv grid is (key-block entries, Hkv); entries are sorted
heaviest first (the schedule is built on the device, no host synchronisation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

__all__ = ["KSAKernelConfig", "default_config", "ksa_attention_triton", "ksa_fwd", "ksa_bwd"]


# ----------------------------------------------------------------------------------------------
# index arithmetic shared by all kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _doc_counts(doc_len, C: tl.constexpr, S: tl.constexpr):
    """Text and summary token counts of a document of `doc_len` interleaved tokens."""
    full = doc_len // (C + S)
    rem = doc_len - full * (C + S)
    n_text = full * C + tl.minimum(rem, C)
    n_sum = full * S + tl.maximum(rem - C, 0)
    return n_text, n_sum


@triton.jit
def _text_row(idx, doc_start, C: tl.constexpr, S: tl.constexpr):
    """Interleaved row (int64) of the document's text token number `idx`."""
    return doc_start + ((idx // C) * (C + S) + idx % C).to(tl.int64)


@triton.jit
def _sum_row(idx, doc_start, C: tl.constexpr, S: tl.constexpr):
    """Interleaved row (int64) of the document's summary token number `idx`."""
    return doc_start + ((idx // S) * (C + S) + C + idx % S).to(tl.int64)


@triton.jit
def _span(lo, hi, ok, BLOCK: tl.constexpr):
    """Tile plan of one interval family: rows `ok` need indices [lo, hi).

    Returns (start, k1, k2, end): tiles from `start` to k1 and from k2 to `end` need the per-row
    mask; tiles in [k1, k2) lie inside every row's interval and run unmasked.
    """
    BIG: tl.constexpr = 1 << 30
    lo_min = tl.min(tl.where(ok, lo, BIG), 0)
    lo_max = tl.max(tl.where(ok, lo, 0), 0)
    hi_min = tl.min(tl.where(ok, hi, BIG), 0)
    hi_max = tl.max(tl.where(ok, hi, 0), 0)
    k1 = lo_min + (lo_max - lo_min + BLOCK - 1) // BLOCK * BLOCK
    k2 = k1 + (tl.maximum(hi_min - k1, 0) // BLOCK) * BLOCK
    return lo_min, k1, k2, hi_max


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k0, lo, hi, k_end, K, V, stride_kt, stride_vt, doc_start, offs_d, d_ok,
              qk_scale, MASKED: tl.constexpr, KEY_IS_SUM: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr):
    kk = k0 + tl.arange(0, BLOCK_N)
    # _sum_row / _text_row written out: every nested jit call costs ~0.6 ms under the interpreter
    if KEY_IS_SUM:
        rows = doc_start + ((kk // S) * (C + S) + C + kk % S).to(tl.int64)
    else:
        rows = doc_start + ((kk // C) * (C + S) + kk % C).to(tl.int64)
    k_ptrs = K + rows[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + rows[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        if EVEN_D:
            ld = (kk < k_end)[:, None]
        else:
            ld = (kk < k_end)[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=ld, other=0.0)
        v = tl.load(v_ptrs, mask=ld, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        vis = (kk[None, :] >= lo[:, None]) & (kk[None, :] < hi[:, None])
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_segment(acc, m_i, l_i, q, lo, hi, ok, K, V, stride_kt, stride_vt, doc_start, offs_d, d_ok, qk_scale,
                 KEY_IS_SUM: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr,
                 EVEN_D: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    start, k1, k2, end = _span(lo, hi, ok, BLOCK_N)
    if INTERPRET:  # the interpreter cannot take tensor loop bounds (numpy 2.4): same tiles, while loops
        k0 = start
        while k0 < tl.minimum(k1, end):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start,
                                      offs_d, d_ok, qk_scale, True, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
            k0 += BLOCK_N
        k0 = k1
        while k0 < k2:
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start,
                                      offs_d, d_ok, qk_scale, False, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
            k0 += BLOCK_N
        k0 = k2
        while k0 < end:
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start,
                                      offs_d, d_ok, qk_scale, True, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
            k0 += BLOCK_N
    else:
        for k0 in range(start, tl.minimum(k1, end), BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start,
                                      offs_d, d_ok, qk_scale, True, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
        for k0 in range(k1, k2, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start,
                                      offs_d, d_ok, qk_scale, False, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
        for k0 in range(k2, end, BLOCK_N):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start,
                                      offs_d, d_ok, qk_scale, True, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
    return acc, m_i, l_i


@triton.jit
def _query_rows(SCHED, CU, pid, hkv, window, C: tl.constexpr, S: tl.constexpr, G: tl.constexpr,
                GP: tl.constexpr, BLOCK_T: tl.constexpr, IDX: tl.constexpr, RELOAD: tl.constexpr):
    """Rows of one query tile (BLOCK_T tokens x GP heads) and their key intervals.

    RELOAD: volatile loads, which the compiler may not merge with the first ones, so that the
    epilogue recomputes the rows instead of keeping them live (in registers) across the loops.
    """
    doc = tl.load(SCHED + pid * 3, volatile=RELOAD).to(IDX)
    kind = tl.load(SCHED + pid * 3 + 1, volatile=RELOAD)
    q0 = tl.load(SCHED + pid * 3 + 2, volatile=RELOAD).to(IDX)
    doc_start = tl.load(CU + doc, volatile=RELOAD).to(tl.int64)
    doc_len = tl.load(CU + doc + 1, volatile=RELOAD).to(IDX) - tl.load(CU + doc, volatile=RELOAD).to(IDX)
    n_text, n_sum = _doc_counts(doc_len, C, S)
    is_sum = kind == 1
    offs_r = tl.arange(0, BLOCK_T * GP)
    tok = q0 + offs_r // GP
    hh = offs_r % GP
    head = hkv * G + hh
    tok_ok = tok < tl.where(is_sum, n_sum, n_text)
    row_ok = tok_ok & (hh < G)
    c_sum = tok // S
    c_win = tl.maximum(tok // C - window, 0)
    t_lo = tl.where(is_sum, c_sum * C, c_win * C)
    t_hi = tl.where(is_sum, c_sum * C + C, tok + 1)
    s_lo = tl.where(is_sum, c_sum * S, 0)
    s_hi = tl.where(is_sum, tok + 1, c_win * S)
    rows = tl.where(is_sum, _sum_row(tok, doc_start, C, S), _text_row(tok, doc_start, C, S))
    return doc_start, rows, head, tok_ok, row_ok, t_lo, t_hi, s_lo, s_hi


@triton.jit
def ksa_fwd_kernel_attn(
    Q, K, V, O, LSE, CU, SCHED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    num_q_heads, window, qk_scale,
    C: tl.constexpr, S: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr, IDX: tl.constexpr,
):
    # index math in IDX: int32 on the GPU (registers), int64 under the interpreter (no per-op overflow checks)
    pid = tl.program_id(0).to(IDX)
    hkv = tl.program_id(1).to(IDX)
    if tl.load(SCHED + pid * 3) < 0:
        return
    doc_start, rows, head, tok_ok, row_ok, t_lo, t_hi, s_lo, s_hi = _query_rows(
        SCHED, CU, pid, hkv, window, C, S, G, GP, BLOCK_T, IDX, False)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    EVEN_D: tl.constexpr = BLOCK_D == D
    # [rows, 1] masks broadcast at use: a materialised [rows, D] mask would stay live in registers
    if EVEN_D:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
    # m starts finite so that a tile masked out for a whole row leaves the row's state unchanged
    m_i = tl.full([BLOCK_T * GP], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_T * GP], tl.float32)
    acc = tl.zeros([BLOCK_T * GP, BLOCK_D], tl.float32)
    Kh = K + hkv * stride_kh
    Vh = V + hkv * stride_vh
    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, t_lo, t_hi, tok_ok, Kh, Vh, stride_kt, stride_vt, doc_start,
                                 offs_d, d_ok, qk_scale, False, C, S, BLOCK_N, EVEN_D, PREC, INTERPRET)
    # the summary segment's intervals, recomputed (volatile reload) rather than held across the text loops
    if not INTERPRET:  # (the interpreter keeps no registers: skip the reload there)
        doc_start, rows, head, tok_ok, row_ok, t_lo, t_hi, s_lo, s_hi = _query_rows(
            SCHED, CU, pid, hkv, window, C, S, G, GP, BLOCK_T, IDX, True)
    acc, m_i, l_i = _fwd_segment(acc, m_i, l_i, q, s_lo, s_hi, tok_ok, Kh, Vh, stride_kt, stride_vt, doc_start,
                                 offs_d, d_ok, qk_scale, True, C, S, BLOCK_N, EVEN_D, PREC, INTERPRET)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    # rows recomputed from reloaded scalars: keeping the first ones live across the loops costs registers
    if not INTERPRET:  # (the interpreter keeps no registers: skip the reload there)
        doc_start, rows, head, tok_ok, row_ok, t_lo, t_hi, s_lo, s_hi = _query_rows(
            SCHED, CU, pid, hkv, window, C, S, G, GP, BLOCK_T, IDX, True)
    if EVEN_D:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(O + rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + rows * num_q_heads + head, m_i + tl.math.log2(l_safe), mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward: delta = rowsum(o * do)
# ----------------------------------------------------------------------------------------------
@triton.jit
def ksa_bwd_kernel_delta(O, DO, DELTA, stride_ot, stride_oh, stride_dot, stride_doh, num_rows,
                         H: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = r // H
    h = r % H
    offs_d = tl.arange(0, BLOCK_D)
    m = (r < num_rows)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :], mask=m, other=0.0)
    do = tl.load(DO + t[:, None] * stride_dot + h[:, None] * stride_doh + offs_d[None, :], mask=m, other=0.0)
    tl.store(DELTA + r, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=r < num_rows)


# ----------------------------------------------------------------------------------------------
# backward: dq (query tiles, same traversal as the forward)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dq_tile(dq, q, do, lse, delta, k0, lo, hi, k_end, K, V, stride_kt, stride_vt, doc_start, offs_d, d_ok,
             qk_scale, MASKED: tl.constexpr, KEY_IS_SUM: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
             BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr):
    kk = k0 + tl.arange(0, BLOCK_N)
    # _sum_row / _text_row written out: every nested jit call costs ~0.6 ms under the interpreter
    if KEY_IS_SUM:
        rows = doc_start + ((kk // S) * (C + S) + C + kk % S).to(tl.int64)
    else:
        rows = doc_start + ((kk // C) * (C + S) + kk % C).to(tl.int64)
    k_ptrs = K + rows[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + rows[:, None] * stride_vt + offs_d[None, :]
    if MASKED:
        if EVEN_D:
            ld = (kk < k_end)[:, None]
        else:
            ld = (kk < k_end)[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=ld, other=0.0)
        v = tl.load(v_ptrs, mask=ld, other=0.0)
    elif EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        vis = (kk[None, :] >= lo[:, None]) & (kk[None, :] < hi[:, None])
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _dq_segment(dq, q, do, lse, delta, lo, hi, ok, K, V, stride_kt, stride_vt, doc_start, offs_d, d_ok, qk_scale,
                KEY_IS_SUM: tl.constexpr, C: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr,
                EVEN_D: tl.constexpr, PREC: tl.constexpr, INTERPRET: tl.constexpr):
    start, k1, k2, end = _span(lo, hi, ok, BLOCK_N)
    if INTERPRET:  # the interpreter cannot take tensor loop bounds (numpy 2.4): same tiles, while loops
        k0 = start
        while k0 < tl.minimum(k1, end):
            dq = _dq_tile(dq, q, do, lse, delta, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start, offs_d,
                          d_ok, qk_scale, True, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
            k0 += BLOCK_N
        k0 = k1
        while k0 < k2:
            dq = _dq_tile(dq, q, do, lse, delta, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start, offs_d,
                          d_ok, qk_scale, False, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
            k0 += BLOCK_N
        k0 = k2
        while k0 < end:
            dq = _dq_tile(dq, q, do, lse, delta, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start, offs_d,
                          d_ok, qk_scale, True, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
            k0 += BLOCK_N
    else:
        for k0 in range(start, tl.minimum(k1, end), BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start, offs_d,
                          d_ok, qk_scale, True, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
        for k0 in range(k1, k2, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start, offs_d,
                          d_ok, qk_scale, False, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
        for k0 in range(k2, end, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k0, lo, hi, end, K, V, stride_kt, stride_vt, doc_start, offs_d,
                          d_ok, qk_scale, True, KEY_IS_SUM, C, S, BLOCK_N, EVEN_D, PREC)
    return dq


@triton.jit
def ksa_bwd_kernel_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU, SCHED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    num_q_heads, window, qk_scale, sm_scale,
    C: tl.constexpr, S: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr, IDX: tl.constexpr,
):
    # index math in IDX: int32 on the GPU (registers), int64 under the interpreter (no per-op overflow checks)
    pid = tl.program_id(0).to(IDX)
    hkv = tl.program_id(1).to(IDX)
    if tl.load(SCHED + pid * 3) < 0:
        return
    doc_start, rows, head, tok_ok, row_ok, t_lo, t_hi, s_lo, s_hi = _query_rows(
        SCHED, CU, pid, hkv, window, C, S, G, GP, BLOCK_T, IDX, False)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    EVEN_D: tl.constexpr = BLOCK_D == D
    # [rows, 1] masks broadcast at use: a materialised [rows, D] mask would stay live in registers
    if EVEN_D:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :], mask=io_mask,
                 other=0.0)
    lse = tl.load(LSE + rows * num_q_heads + head, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + rows * num_q_heads + head, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_T * GP, BLOCK_D], tl.float32)
    Kh = K + hkv * stride_kh
    Vh = V + hkv * stride_vh
    dq = _dq_segment(dq, q, do, lse, delta, t_lo, t_hi, tok_ok, Kh, Vh, stride_kt, stride_vt, doc_start, offs_d,
                     d_ok, qk_scale, False, C, S, BLOCK_N, EVEN_D, PREC, INTERPRET)
    # the summary segment's intervals, recomputed (volatile reload) rather than held across the text loops
    if not INTERPRET:  # (the interpreter keeps no registers: skip the reload there)
        doc_start, rows, head, tok_ok, row_ok, t_lo, t_hi, s_lo, s_hi = _query_rows(
            SCHED, CU, pid, hkv, window, C, S, G, GP, BLOCK_T, IDX, True)
    dq = _dq_segment(dq, q, do, lse, delta, s_lo, s_hi, tok_ok, Kh, Vh, stride_kt, stride_vt, doc_start, offs_d,
                     d_ok, qk_scale, True, C, S, BLOCK_N, EVEN_D, PREC, INTERPRET)
    if not INTERPRET:  # (the interpreter keeps no registers: skip the reload there)
        doc_start, rows, head, tok_ok, row_ok, t_lo, t_hi, s_lo, s_hi = _query_rows(
            SCHED, CU, pid, hkv, window, C, S, G, GP, BLOCK_T, IDX, True)  # see the forward's epilogue
    if EVEN_D:
        io_mask = row_ok[:, None]
    else:
        io_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(DQ + rows[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=io_mask)


# ----------------------------------------------------------------------------------------------
# backward: dk, dv (key tiles; loop over the queries that see them)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _key_rows(SCHED, CU, pid, C: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr, IDX: tl.constexpr,
              RELOAD: tl.constexpr):
    """Keys of one dk/dv program: BLOCK_N text keys (kind 0) or summary keys (kind 1) of one document.

    RELOAD: volatile loads, which the compiler may not merge with the first ones, so that the
    epilogue recomputes the rows instead of keeping them live (in registers) across the loops.
    """
    doc = tl.load(SCHED + pid * 3, volatile=RELOAD).to(IDX)
    is_sum = tl.load(SCHED + pid * 3 + 1, volatile=RELOAD) == 1
    k0 = tl.load(SCHED + pid * 3 + 2, volatile=RELOAD).to(IDX)
    doc_start = tl.load(CU + doc, volatile=RELOAD).to(tl.int64)
    doc_len = tl.load(CU + doc + 1, volatile=RELOAD).to(IDX) - tl.load(CU + doc, volatile=RELOAD).to(IDX)
    n_text, n_sum = _doc_counts(doc_len, C, S)
    kk = k0 + tl.arange(0, BLOCK_N)
    key_ok = kk < tl.where(is_sum, n_sum, n_text)
    rows = tl.where(is_sum, _sum_row(kk, doc_start, C, S), _text_row(kk, doc_start, C, S))
    return doc_start, kk, rows, key_ok, is_sum, n_text, n_sum


@triton.jit
def _dkdv_tile(dk, dv, k, v, q0, lo, hi, q_end, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh,
               num_q_heads, hkv, doc_start, offs_d, d_ok, qk_scale,
               MASKED: tl.constexpr, QUERY_IS_SUM: tl.constexpr, C: tl.constexpr, S: tl.constexpr,
               G: tl.constexpr, GP: tl.constexpr, BLOCK_TQ: tl.constexpr, EVEN_D: tl.constexpr,
               PREC: tl.constexpr):
    offs_r = tl.arange(0, BLOCK_TQ * GP)
    tq = q0 + offs_r // GP
    hh = offs_r % GP
    head = hkv * G + hh
    if QUERY_IS_SUM:  # _sum_row / _text_row written out (interpreter cost of nested calls)
        rows = doc_start + ((tq // S) * (C + S) + C + tq % S).to(tl.int64)
    else:
        rows = doc_start + ((tq // C) * (C + S) + tq % C).to(tl.int64)
    q_ptrs = Q + rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    do_ptrs = DO + rows[:, None] * stride_dot + head[:, None] * stride_doh + offs_d[None, :]
    stat_offs = rows * num_q_heads + head
    if MASKED or GP != G or not EVEN_D:
        if MASKED:
            row_ld = (tq < q_end) & (hh < G)
        else:
            row_ld = hh < G  # the group is padded to a power of two
        if EVEN_D:
            ld = row_ld[:, None]
        else:
            ld = row_ld[:, None] & d_ok[None, :]
        q = tl.load(q_ptrs, mask=ld, other=0.0)
        do = tl.load(do_ptrs, mask=ld, other=0.0)
        lse = tl.load(LSE + stat_offs, mask=row_ld, other=0.0)
        delta = tl.load(DELTA + stat_offs, mask=row_ld, other=0.0)
    else:  # interior tile of an unpadded group: no masks at all
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(LSE + stat_offs)
        delta = tl.load(DELTA + stat_offs)
    # padded rows load q = do = lse = delta = 0: p = 1 there but dp = 0 and do = 0, so they add nothing
    s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale          # [BLOCK_N, rows]
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASKED:
        vis = (tq[None, :] >= lo[:, None]) & (tq[None, :] < hi[:, None]) & (hh < G)[None, :]
        p_t = tl.where(vis, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_segment(dk, dv, k, v, lo, hi, ok, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh,
                  num_q_heads, hkv, doc_start, offs_d, d_ok, qk_scale,
                  QUERY_IS_SUM: tl.constexpr, C: tl.constexpr, S: tl.constexpr, G: tl.constexpr,
                  GP: tl.constexpr, BLOCK_TQ: tl.constexpr, EVEN_D: tl.constexpr, PREC: tl.constexpr,
                  INTERPRET: tl.constexpr):
    start, q1, q2, end = _span(lo, hi, ok, BLOCK_TQ)
    if INTERPRET:  # the interpreter cannot take tensor loop bounds (numpy 2.4): same tiles, while loops
        q0 = start
        while q0 < tl.minimum(q1, end):
            dk, dv = _dkdv_tile(dk, dv, k, v, q0, lo, hi, end, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot,
                                stride_doh, num_q_heads, hkv, doc_start, offs_d, d_ok, qk_scale,
                                True, QUERY_IS_SUM, C, S, G, GP, BLOCK_TQ, EVEN_D, PREC)
            q0 += BLOCK_TQ
        q0 = q1
        while q0 < q2:
            dk, dv = _dkdv_tile(dk, dv, k, v, q0, lo, hi, end, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot,
                                stride_doh, num_q_heads, hkv, doc_start, offs_d, d_ok, qk_scale,
                                False, QUERY_IS_SUM, C, S, G, GP, BLOCK_TQ, EVEN_D, PREC)
            q0 += BLOCK_TQ
        q0 = q2
        while q0 < end:
            dk, dv = _dkdv_tile(dk, dv, k, v, q0, lo, hi, end, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot,
                                stride_doh, num_q_heads, hkv, doc_start, offs_d, d_ok, qk_scale,
                                True, QUERY_IS_SUM, C, S, G, GP, BLOCK_TQ, EVEN_D, PREC)
            q0 += BLOCK_TQ
    else:
        for q0 in range(start, tl.minimum(q1, end), BLOCK_TQ):
            dk, dv = _dkdv_tile(dk, dv, k, v, q0, lo, hi, end, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot,
                                stride_doh, num_q_heads, hkv, doc_start, offs_d, d_ok, qk_scale,
                                True, QUERY_IS_SUM, C, S, G, GP, BLOCK_TQ, EVEN_D, PREC)
        for q0 in range(q1, q2, BLOCK_TQ):
            dk, dv = _dkdv_tile(dk, dv, k, v, q0, lo, hi, end, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot,
                                stride_doh, num_q_heads, hkv, doc_start, offs_d, d_ok, qk_scale,
                                False, QUERY_IS_SUM, C, S, G, GP, BLOCK_TQ, EVEN_D, PREC)
        for q0 in range(q2, end, BLOCK_TQ):
            dk, dv = _dkdv_tile(dk, dv, k, v, q0, lo, hi, end, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot,
                                stride_doh, num_q_heads, hkv, doc_start, offs_d, d_ok, qk_scale,
                                True, QUERY_IS_SUM, C, S, G, GP, BLOCK_TQ, EVEN_D, PREC)
    return dk, dv


@triton.jit
def ksa_bwd_kernel_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU, SCHED,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    num_q_heads, window, qk_scale, sm_scale,
    C: tl.constexpr, S: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_TQ: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    INTERPRET: tl.constexpr, IDX: tl.constexpr,
):
    # index math in IDX: int32 on the GPU (registers), int64 under the interpreter (no per-op overflow checks)
    pid = tl.program_id(0).to(IDX)
    hkv = tl.program_id(1).to(IDX)
    if tl.load(SCHED + pid * 3) < 0:
        return
    doc_start, kk, rows, key_ok, is_sum, n_text, n_sum = _key_rows(SCHED, CU, pid, C, S, BLOCK_N, IDX, False)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    EVEN_D: tl.constexpr = BLOCK_D == D
    if EVEN_D:
        io_mask = key_ok[:, None]
    else:
        io_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(K + rows[:, None] * stride_kt + hkv * stride_kh + offs_d[None, :], mask=io_mask, other=0.0)
    v = tl.load(V + rows[:, None] * stride_vt + hkv * stride_vh + offs_d[None, :], mask=io_mask, other=0.0)
    c_t = kk // C
    c_s = kk // S
    tq_lo = tl.where(is_sum, tl.minimum((c_s + window + 1) * C, n_text), kk)
    tq_hi = tl.where(is_sum, n_text, tl.minimum((c_t + window + 1) * C, n_text))
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _dkdv_segment(dk, dv, k, v, tq_lo, tq_hi, key_ok, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot,
                           stride_doh, num_q_heads, hkv, doc_start, offs_d, d_ok, qk_scale,
                           False, C, S, G, GP, BLOCK_TQ, EVEN_D, PREC, INTERPRET)
    # the summary-query intervals, recomputed (volatile reload) rather than held across the text loops
    if not INTERPRET:  # (the interpreter keeps no registers: skip the reload there)
        doc_start, kk, rows, key_ok, is_sum, n_text, n_sum = _key_rows(SCHED, CU, pid, C, S, BLOCK_N, IDX, True)
    c_t = kk // C
    c_s = kk // S
    sq_lo = tl.where(is_sum, kk, c_t * S)
    sq_hi = tl.where(is_sum, tl.minimum((c_s + 1) * S, n_sum), tl.minimum((c_t + 1) * S, n_sum))
    dk, dv = _dkdv_segment(dk, dv, k, v, sq_lo, sq_hi, key_ok, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot,
                           stride_doh, num_q_heads, hkv, doc_start, offs_d, d_ok, qk_scale,
                           True, C, S, G, GP, BLOCK_TQ, EVEN_D, PREC, INTERPRET)
    # rows recomputed from reloaded scalars: keeping the first ones live across the loops costs ~25 registers
    if not INTERPRET:  # (the interpreter keeps no registers: skip the reload there)
        doc_start, kk, rows, key_ok, is_sum, n_text, n_sum = _key_rows(SCHED, CU, pid, C, S, BLOCK_N, IDX, True)
    if EVEN_D:
        io_mask = key_ok[:, None]
    else:
        io_mask = key_ok[:, None] & d_ok[None, :]
    tl.store(DK + rows[:, None] * stride_dkt + hkv * stride_dkh + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=io_mask)
    tl.store(DV + rows[:, None] * stride_dvt + hkv * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=io_mask)


# ----------------------------------------------------------------------------------------------
# host side: configuration, schedules, launches
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KSAKernelConfig:
    """Tile sizes (tokens are per KV group: a tile has block_t * next_pow2(G) rows) and launch options."""

    fwd_block_t: int
    fwd_block_n: int
    fwd_warps: int
    fwd_stages: int
    dq_block_t: int
    dq_block_n: int
    dq_warps: int
    dq_stages: int
    dkdv_block_n: int
    dkdv_block_t: int
    dkdv_warps: int
    dkdv_stages: int

    def with_(self, **kw) -> "KSAKernelConfig":
        return replace(self, **kw)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(*, head_dim: int, group: int, dtype: torch.dtype, on_gpu: bool) -> KSAKernelConfig:
    """Tile sizes chosen by a plain function (autotuning does not run under the interpreter).

    GPU, bf16/fp16, D <= 128: forward and dq tiles of 128 query rows (16 tokens x 8 heads for the
    real model) against 64-key tiles, 8 warps; dk/dv programs own 128 keys and walk query tiles of
    32 rows (4 tokens x 8 heads). Checked by compiling for sm_90 (ptxas): no register spills
    (128 keys x 64 rows does spill). fp32 (tests) or D > 128: half the tile sizes.
    A dot with M rows is spread over M / 16 warps at most (more warps would replicate work).
    Interpreter: small tiles so that tests cross tile, chunk and document edges.
    """
    gp = _pow2(group)
    if not on_gpu:  # interpreter: cost grows with programs and tiles, not with tile size
        bt = max(1, 16 // gp)
        return KSAKernelConfig(bt, 16, 4, 1, bt, 16, 4, 1, 16, max(1, 8 // gp), 4, 1)
    wide = dtype == torch.float32 or _pow2(head_dim) > 128
    min_bt = _pow2(-(-16 // gp))                    # tl.dot needs >= 16 rows
    q_bt = max((64 if wide else 128) // gp, min_bt)
    q_warps = 8 if q_bt * gp >= 128 else 4
    k_n = 64 if wide else 128
    k_bt = max((16 if wide else 32) // gp, min_bt)
    return KSAKernelConfig(
        fwd_block_t=q_bt, fwd_block_n=32 if wide else 64, fwd_warps=q_warps, fwd_stages=2 if wide else 3,
        dq_block_t=q_bt, dq_block_n=32 if wide else 64, dq_warps=q_warps, dq_stages=2,
        dkdv_block_n=k_n, dkdv_block_t=k_bt, dkdv_warps=8 if k_n >= 128 else 4, dkdv_stages=1 if wide else 2,
    )


def _doc_counts_torch(cu: torch.Tensor, chunk: int, num_summary: int) -> tuple[torch.Tensor, torch.Tensor]:
    period = chunk + num_summary
    length = cu[1:].long() - cu[:-1].long()
    full = length // period
    rem = length - full * period
    return full * chunk + rem.clamp(max=chunk), full * num_summary + (rem - chunk).clamp(min=0)


def _blocks(counts: torch.Tensor, block: int, upper: int):
    """Enumerate (doc, first index, valid) of all `block`-sized pieces of per-document `counts`."""
    num_docs = counts.numel()
    per_doc = (counts + block - 1) // block
    cum = per_doc.cumsum(0)
    e = torch.arange(upper, device=counts.device)
    doc = torch.searchsorted(cum, e, right=True)
    valid = doc < num_docs
    doc = doc.clamp(max=num_docs - 1)
    first = (e - (cum[doc] - per_doc[doc])) * block
    return doc, first, valid


def _upper_blocks(num_tokens: int, num_docs: int, share: int, period: int, extra: int, block: int) -> int:
    # sum over docs of ceil(n_d / block) <= (sum n_d) / block + docs, with sum n_d <= T*share/period + extra
    return (num_tokens * share // period + extra) // block + num_docs + 1


def _schedule(entries: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Stack (doc, kind, first, valid, work) pieces into an int32 [E, 3] table, heaviest work first."""
    docs, kinds, firsts, works = [], [], [], []
    for doc, kind, first, valid, work in entries:
        docs.append(torch.where(valid, doc, -1))
        kinds.append(torch.full_like(doc, kind))
        firsts.append(first)
        works.append(torch.where(valid, work.float(), -1.0))
    table = torch.stack([torch.cat(docs), torch.cat(kinds), torch.cat(firsts)], 1).to(torch.int32)
    order = torch.sort(torch.cat(works), descending=True, stable=True).indices
    return table[order].contiguous()


def _query_schedule(cu, num_tokens, chunk, num_summary, window, block_t) -> torch.Tensor:
    """Forward / dq programs: text-query blocks (work grows with the summary prefix), then summary blocks."""
    n_text, n_sum = _doc_counts_torch(cu, chunk, num_summary)
    num_docs, period = n_text.numel(), chunk + num_summary
    doc, first, valid = _blocks(n_text, block_t, _upper_blocks(num_tokens, num_docs, chunk, period,
                                                                num_docs * chunk, block_t))
    c0 = first // chunk
    work_t = first.clamp(max=window * chunk) + block_t + (c0 - window).clamp(min=0) * num_summary
    doc_s, first_s, valid_s = _blocks(n_sum, block_t, _upper_blocks(num_tokens, num_docs, num_summary, period, 0,
                                                                    block_t))
    work_s = torch.full_like(first_s, block_t * (chunk // num_summary + 1))
    return _schedule([(doc, 0, first, valid, work_t), (doc_s, 1, first_s, valid_s, work_s)])


def _key_schedule(cu, num_tokens, chunk, num_summary, window, block_n) -> torch.Tensor:
    """dk/dv programs: summary-key blocks (seen by every later text query: heaviest), then text-key blocks."""
    n_text, n_sum = _doc_counts_torch(cu, chunk, num_summary)
    num_docs, period = n_text.numel(), chunk + num_summary
    doc, first, valid = _blocks(n_text, block_n, _upper_blocks(num_tokens, num_docs, chunk, period,
                                                                num_docs * chunk, block_n))
    work_t = (n_text[doc] - first).clamp(max=(window + 1) * chunk + block_n) + block_n
    doc_s, first_s, valid_s = _blocks(n_sum, block_n, _upper_blocks(num_tokens, num_docs, num_summary, period, 0,
                                                                    block_n))
    work_s = (n_text[doc_s] - (first_s // num_summary + window + 1) * chunk).clamp(min=0) + block_n
    return _schedule([(doc, 0, first, valid, work_t), (doc_s, 1, first_s, valid_s, work_s)])


# Kernels decorated while TRITON_INTERPRET=1 run in Python; they need while loops (see _fwd_segment).
_INTERPRET = type(ksa_fwd_kernel_attn).__name__ == "InterpretedFunction"
# Index dtype: int32 on the GPU (fewer registers; documents and windows stay far below 2^31 / C),
# int64 in the interpreter, whose int32 adds and multiplies each run an overflow check in Python.
_IDX = tl.int64 if _INTERPRET else tl.int32


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 (tests): three tf32 passes, ~fp32 accurate on tensor cores ("ieee" falls back to FMA loops
    # that spill heavily at these tiles). "tf32" is the default and has no effect on 16-bit inputs.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def ksa_fwd(q, k, v, cu, *, chunk, num_summary, window, scale, config: KSAKernelConfig, o=None, lse=None):
    """q [T, Hq, D], k/v [T, Hkv, D], cu int32 [docs+1] -> (o [T, Hq, D], lse [T, Hq] fp32, log2 units).

    `o` / `lse` may be given (tests pass NaN-filled buffers to catch unwritten elements).
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    o = torch.empty_like(q, memory_format=torch.contiguous_format) if o is None else o
    lse = torch.empty((T, Hq), device=q.device, dtype=torch.float32) if lse is None else lse
    if T == 0:
        return o, lse
    sched = _query_schedule(cu, T, chunk, num_summary, window, config.fwd_block_t)
    grid = (sched.shape[0], Hkv)
    ksa_fwd_kernel_attn[grid](
        q, k, v, o, lse, cu, sched,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        Hq, window, scale * math.log2(math.e),
        C=chunk, S=num_summary, G=G, GP=_pow2(G), BLOCK_T=config.fwd_block_t, BLOCK_N=config.fwd_block_n,
        D=D, BLOCK_D=max(16, _pow2(D)), PREC=_dot_precision(q.dtype), INTERPRET=_INTERPRET, IDX=_IDX,
        num_warps=config.fwd_warps, num_stages=config.fwd_stages,
    )
    return o, lse


def ksa_bwd(do, q, k, v, o, lse, cu, *, chunk, num_summary, window, scale, config: KSAKernelConfig,
            dq=None, dk=None, dv=None):
    """Gradients (dq, dk, dv) of `ksa_fwd`; recomputes the probabilities from q, k and the saved lse.

    Every element of dq, dk, dv is written exactly once (no zero-init, no atomics): each token is a
    query of one query tile and a key of one key block. Buffers may be passed in (tests poison them).
    """
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    G, GP, BD = Hq // Hkv, _pow2(Hq // Hkv), max(16, _pow2(D))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if dq is None else dq
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if dk is None else dk
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if dv is None else dv
    if T == 0:
        return dq, dk, dv
    delta = torch.empty((T, Hq), device=q.device, dtype=torch.float32)
    block_r = 64
    ksa_bwd_kernel_delta[(triton.cdiv(T * Hq, block_r),)](
        o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), T * Hq,
        H=Hq, D=D, BLOCK_R=block_r, BLOCK_D=BD,
    )
    qk_scale = scale * math.log2(math.e)
    prec = _dot_precision(q.dtype)
    sched_q = _query_schedule(cu, T, chunk, num_summary, window, config.dq_block_t)
    ksa_bwd_kernel_dq[(sched_q.shape[0], Hkv)](
        q, k, v, do, lse, delta, dq, cu, sched_q,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1),
        Hq, window, qk_scale, scale,
        C=chunk, S=num_summary, G=G, GP=GP, BLOCK_T=config.dq_block_t, BLOCK_N=config.dq_block_n,
        D=D, BLOCK_D=BD, PREC=prec, INTERPRET=_INTERPRET, IDX=_IDX, num_warps=config.dq_warps, num_stages=config.dq_stages,
    )
    sched_k = _key_schedule(cu, T, chunk, num_summary, window, config.dkdv_block_n)
    ksa_bwd_kernel_dkdv[(sched_k.shape[0], Hkv)](
        q, k, v, do, lse, delta, dk, dv, cu, sched_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        Hq, window, qk_scale, scale,
        C=chunk, S=num_summary, G=G, GP=GP, BLOCK_N=config.dkdv_block_n, BLOCK_TQ=config.dkdv_block_t,
        D=D, BLOCK_D=BD, PREC=prec, INTERPRET=_INTERPRET, IDX=_IDX, num_warps=config.dkdv_warps, num_stages=config.dkdv_stages,
    )
    return dq, dk, dv


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _KSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, chunk, num_summary, window, scale, config):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        o, lse = ksa_fwd(q, k, v, cu, chunk=chunk, num_summary=num_summary, window=window, scale=scale,
                         config=config)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.args = dict(chunk=chunk, num_summary=num_summary, window=window, scale=scale, config=config)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        dq, dk, dv = ksa_bwd(_last_dim_contiguous(do), q, k, v, o, lse, cu, **ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk: int, window: int, num_summary: int,
                 cu_seqlens: torch.Tensor | None) -> None:
    """ValueError naming the input a caller got wrong (kernels.ksa.ksa_attention on every backend, and
    ksa_attention_triton): shapes, dtypes and devices, chunk, window, num_summary and cu_seqlens' form (its
    boundaries are checked by ksa_token_info, off the GPU)."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B,T,Hq,D] and k, v [B,T,Hkv,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    B, T, Hq, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, tokens or head dim")
    if Hq % k.shape[2]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[2]})")
    if chunk < 1 or num_summary < 1:
        raise ValueError(f"chunk ({chunk}) and num_summary ({num_summary}) must be >= 1")
    if window < 0:
        raise ValueError(f"window must be >= 0 chunks, got {window}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"packed input (cu_seqlens) needs batch 1, got {B}")
        if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
        # boundaries are token positions: a float one would be cut to an integer without a word
        if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
            raise ValueError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    # the kernels take q . k as one dot product and p . v as another: one floating dtype for all three
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def ksa_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk: int, window: int, num_summary: int = 1,
    cu_seqlens: torch.Tensor | None = None, scale: float | None = None, config: KSAKernelConfig | None = None,
) -> torch.Tensor:
    """KSA with the Triton kernels: q [B, T, Hq, D], k/v [B, T, Hkv, D] interleaved -> [B, T, Hq, D].

    `cu_seqlens` (int32/int64 [docs+1], interleaved boundaries, last entry == T; needs B == 1) packs
    documents; without it every batch row is one document. Its boundaries are not checked on the GPU (no host sync);
    the inputs' shapes, dtypes and devices are (check_inputs).
    """
    check_inputs(q, k, v, chunk=chunk, window=window, num_summary=num_summary, cu_seqlens=cu_seqlens)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if not q.is_cuda and not _INTERPRET:
        raise ValueError("the Triton KSA kernels need CUDA tensors, or TRITON_INTERPRET=1 set before kernels.ksa "
                         "is imported; on CPU use backend='naive'")
    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T
    else:
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    if config is None:
        config = default_config(head_dim=D, group=Hq // Hkv, dtype=q.dtype, on_gpu=q.is_cuda)
    # windows longer than any document change nothing; clipping keeps the int32 index math in range
    window = min(int(window), B * T + 1)
    scale = D ** -0.5 if scale is None else float(scale)
    o = _KSAFunction.apply(q.reshape(B * T, Hq, D), k.reshape(B * T, Hkv, D), v.reshape(B * T, Hkv, D), cu,
                           chunk, num_summary, window, scale, config)
    return o.view(B, T, Hq, D)
