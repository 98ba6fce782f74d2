"""The dense (warm-up) stage's indexer KL and its gradients, on wide tiles (Triton).

In the dense stage every token's key set is its whole causal prefix within its document, so neighbouring
tokens share their keys, and the work can be tiled like dense attention: BM consecutive tokens against BN
consecutive keys. (The sparse stage's kernels in indexer_loss.py walk a per-block union of selected keys
with 4-token blocks, the shape a per-token selection allows; in the dense stage that shape reloads every
key tile once per 4 tokens.) Notation as in indexer_loss.py:

    P[t, s] = sum_h exp(scale q[t, h] . k[s, h // G] - lse[t, h])     head-summed attention, Z = Hq
    I[t, s] = sum_j w[t, j] relu(q_idx[t, j] . k_idx[s])
    KL_t    = sum_s p log p - sum_s p (I - lse_I[t]),   p = P / Z
    dKL_t / dI[t, s] = softmax(I)[t, s] - P[t, s] / Z =: d[t, s]

Z = Hq exactly: each head's softmax over the row's keys sums to 1 (lse is taken over the same keys). The
KL sums P log P, P and P I as measured, so it equals the sparse-stage formula.

`dense_kl_kernel_lse` gives the target's lse (`dense_attention_lse`: a program per row tile and query head,
flash-attention style). Then four kernels, the last three per chunk of rows whose d fits `chunk_bytes`:
  1. `dense_kl_kernel_lse_i`: lse_I per row, per key segment (merged in PyTorch: no atomics).
  2. `dense_kl_kernel_d`: P (32 per-head dots of BM tokens x BN keys) and I (16 per-head dots) on each
     tile; d into the chunk's buffer [rows, keys] (fp32), the KL's three sums per (row, segment).
  3. `dense_kl_kernel_dq`: dq_idx and dw, token-major (BQ tokens x HIP indexer heads stacked as rows),
     written once per token.
  4. `dense_kl_kernel_dk`: dk_idx, key-major (each program owns BN keys and walks the chunk's token
     blocks), so no atomics: one read-add-write of its rows per chunk, chunks in order.
Deterministic: every sum runs in a fixed order. Nothing of size rows x keys outlives a chunk.
"""
from __future__ import annotations

import bisect
import math

import torch
import triton
import triton.language as tl

from .common import LOG2E, dot_precision, interpreting, pow2, relu_nan
from .indexer_loss import _kl_sums, _load_indexer_rows, _lse_step


@triton.jit
def _scores(q_idx, w, row, has, kt, dd, dmask, HI: tl.constexpr, DI: tl.constexpr,
            DOT_PREC: tl.constexpr):
    """I [BM, BN] of the rows against the index keys kt [BN, DIP]: per indexer head a [BM, DI] x
    [DI, BN] dot, ReLU, weight. A runtime loop over the heads: unrolled, the compiler hoists every
    head's query tile out of the key loop into shared memory."""
    score = tl.zeros([row.shape[0], kt.shape[0]], dtype=tl.float32)
    for j in range(HI):
        qj = tl.load(q_idx + (row * HI + j)[:, None] * DI + dd[None, :],
                     mask=has[:, None] & dmask[None, :], other=0.0)
        wj = tl.load(w + row * HI + j, mask=has, other=0.0).to(tl.float32)
        u = tl.dot(qj, tl.trans(kt), input_precision=DOT_PREC)
        score += relu_nan(u) * wj[:, None]
    return score


@triton.jit
def _row_range(start_ptr, bb, t, tvalid, T, BN: tl.constexpr):
    """Rows t of batch row bb: their document starts, which of them have keys (start <= t; a row
    whose start lies past it has none), and the key tiles [lo, hi) any of them reaches (lo a
    multiple of BN)."""
    row = (bb * T + tl.minimum(t, T - 1)).to(tl.int64)
    start = tl.load(start_ptr + row, mask=tvalid, other=0)
    has = tvalid & (start <= t)
    lo = (tl.min(tl.where(has, start, T), axis=0) // BN) * BN
    hi = tl.max(tl.where(has, t + 1, 0), axis=0)
    return row, start, has, lo, hi


@triton.jit
def _member(has, start, t, s, smask):
    """[rows, keys]: key s is one of row t's (causal, from its document start)."""
    return has[:, None] & (s[None, :] >= start[:, None]) & (s[None, :] <= t[:, None]) & smask[None, :]


@triton.jit
def _index_keys(k_idx, bb, T, s, smask, dd, DI: tl.constexpr):
    """The index keys [BN, DIP] of positions s of batch row bb (zero where masked)."""
    return tl.load(k_idx + ((bb * T + s).to(tl.int64) * DI)[:, None] + dd[None, :],
                   mask=smask[:, None] & (dd[None, :] < DI), other=0.0)


@triton.jit
def _grid_rows(start_ptr, NBT, T, BM: tl.constexpr, BN: tl.constexpr):
    """The row tile of program_id(0) over B * NBT tiles of BM rows: batch row, rows, which are real,
    and _row_range's (row, start, has, lo, hi)."""
    pid = tl.program_id(0)
    bb = pid // NBT
    t = (pid % NBT) * BM + tl.arange(0, BM)
    tvalid = t < T
    return (bb, t, tvalid) + _row_range(start_ptr, bb, t, tvalid, T, BN)


@triton.jit(do_not_specialize=["T", "NBT"])
def dense_kl_kernel_lse(q, k, lse, start_ptr, T, NBT, scale_log2, HQ: tl.constexpr,
                        HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (row tile, query head): the dense attention's lse [B, T, Hq] over each row's keys
    (start..t), flash-attention style: the head's query tile stays in registers while its KV
    group's key tiles stream past (-inf for a row without keys)."""
    h = tl.program_id(1)
    bb, t, tvalid, row, start, has, lo, hi = _grid_rows(start_ptr, NBT, T, BM, BN)
    g = h // G
    d = tl.arange(0, DP)
    dmask = d < D
    qh = tl.load(q + (row * HQ + h)[:, None] * D + d[None, :], mask=has[:, None] & dmask[None, :],
                 other=0.0)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    for s0 in range(lo, hi, BN):
        s = s0 + tl.arange(0, BN)
        kg = tl.load(k + ((bb * T + s).to(tl.int64) * HKV + g)[:, None] * D + d[None, :],
                     mask=(s < hi)[:, None] & dmask[None, :], other=0.0)
        x = tl.dot(qh, tl.trans(kg), input_precision=DOT_PREC) * scale_log2
        ok = (s[None, :] >= start[:, None]) & (s[None, :] <= t[:, None]) & has[:, None]
        x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
        m_i = m_new
    out = (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) * 0.6931471805599453
    tl.store(lse + row * HQ + h, out, mask=tvalid)


@triton.jit(do_not_specialize=["T", "NBT", "NSEG", "KS"])
def dense_kl_kernel_lse_i(q_idx, w, k_idx, start_ptr, part_ptr, T, NBT, NSEG, KS,
                          HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (row tile, key segment): the indexer's log-sum-exp over the segment's member keys
    (-inf for none) into part_ptr [B*T, NSEG]."""
    seg = tl.program_id(1)
    bb, t, tvalid, row, start, has, lo, hi = _grid_rows(start_ptr, NBT, T, BM, BN)
    lo = tl.maximum(lo, seg * KS)
    hi = tl.minimum(hi, seg * KS + KS)
    dd = tl.arange(0, DIP)
    dmask = dd < DI
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    for s0 in range(lo, hi, BN):
        s = s0 + tl.arange(0, BN)
        smask = s < hi
        kt = _index_keys(k_idx, bb, T, s, smask, dd, DI)
        score = _scores(q_idx, w, row, has, kt, dd, dmask, HI, DI, DOT_PREC)
        m_i, l_i = _lse_step(m_i, l_i, score, _member(has, start, t, s, smask))
    out = tl.where(l_i > 0.0, m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    tl.store(part_ptr + row * NSEG + seg, out, mask=tvalid)


@triton.jit(do_not_specialize=["T", "R0", "NR", "W", "NSEG", "KS", "bb"])
def dense_kl_kernel_d(q, k, lse, q_idx, w, k_idx, start_ptr, lse_i_ptr, d_ptr, part_ptr, T, R0, NR,
                      W, NSEG, KS, bb, scale_log2, inv_z, HQ: tl.constexpr, HKV: tl.constexpr,
                      G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HI: tl.constexpr,
                      DI: tl.constexpr, DIP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      STORE_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (row tile of the chunk [R0, R0 + NR) of batch row bb, key segment): on each key tile
    the head-summed P and the scores I, d = softmax(I) - P / Z into d_ptr [NR, W] (members only;
    STORE_D False: the KL alone), and the row's sums of P log P, P and P I into part_ptr
    [NR, NSEG, 3]."""
    t = R0 + tl.program_id(0) * BM + tl.arange(0, BM)
    seg = tl.program_id(1)
    tvalid = t < R0 + NR
    row, start, has, lo, hi = _row_range(start_ptr, bb, t, tvalid, T, BN)
    lo = tl.maximum(lo, seg * KS)
    hi = tl.minimum(hi, seg * KS + KS)
    lse_i = tl.load(lse_i_ptr + row, mask=has, other=0.0)
    d = tl.arange(0, DP)
    dmask = d < D
    dd = tl.arange(0, DIP)
    ddmask = dd < DI
    a_i = tl.zeros([BM], dtype=tl.float32)
    z_i = tl.zeros([BM], dtype=tl.float32)
    b_i = tl.zeros([BM], dtype=tl.float32)
    line = (t - R0).to(tl.int64) * W
    for s0 in range(lo, hi, BN):
        s = s0 + tl.arange(0, BN)
        smask = s < hi
        member = _member(has, start, t, s, smask)
        psum = tl.zeros([BM, BN], dtype=tl.float32)
        for g in range(HKV):  # runtime loops: see _scores
            kg = tl.load(k + ((bb * T + s).to(tl.int64) * HKV + g)[:, None] * D + d[None, :],
                         mask=smask[:, None] & dmask[None, :], other=0.0)
            for h in range(G):
                head = row * HQ + g * G + h
                qh = tl.load(q + head[:, None] * D + d[None, :], mask=has[:, None] & dmask[None, :],
                             other=0.0)
                lh = tl.load(lse + head, mask=has, other=0.0) * 1.4426950408889634
                x = tl.dot(qh, tl.trans(kg), input_precision=DOT_PREC) * scale_log2
                psum += tl.exp2(x - lh[:, None])
        psum = tl.where(member, psum, 0.0)
        kt = _index_keys(k_idx, bb, T, s, smask, dd, DI)
        score = _scores(q_idx, w, row, has, kt, dd, ddmask, HI, DI, DOT_PREC)
        a_i, z_i, b_i = _kl_sums(a_i, z_i, b_i, psum, score, member)
        if STORE_D:
            dv = tl.exp(tl.where(member, score, float("-inf")) - lse_i[:, None]) - psum * inv_z
            tl.store(d_ptr + line[:, None] + s[None, :], dv.to(d_ptr.dtype.element_ty), mask=member)
    out = part_ptr + ((t - R0).to(tl.int64) * NSEG + seg) * 3
    tl.store(out, a_i, mask=tvalid)
    tl.store(out + 1, z_i, mask=tvalid)
    tl.store(out + 2, b_i, mask=tvalid)


@triton.jit
def _d_tile(d_ptr, line, s, member):
    return tl.load(d_ptr + line + s, mask=member, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["T", "R0", "NR", "W", "bb"])
def dense_kl_kernel_dq(q_idx, w, k_idx, start_ptr, d_ptr, gscale_ptr, dq_idx, dw, T, R0, NR, W, bb,
                       HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
                       BQ: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (block of BQ tokens of the chunk): dq_idx and dw of its tokens from d, the BQ x HIP
    (token, indexer head) query rows stacked into one tile: per key tile u = q_idx k_idx^T,
    du = d w [u > 0], dq_idx += du k_idx, dw += sum relu(u) d; times gscale."""
    t0 = R0 + tl.program_id(0) * BQ
    t = t0 + tl.arange(0, BQ)
    tvalid = t < R0 + NR
    row, start, has, lo, hi = _row_range(start_ptr, bb, t, tvalid, T, BN)
    qi, wv, irow, imask, ivalid = _load_indexer_rows(q_idx, w, bb, t0, T, HI, DI, DIP, BQ, HIP)
    dd = tl.arange(0, DIP)
    line = (t - R0).to(tl.int64) * W
    dqi = tl.zeros([BQ * HIP, DIP], dtype=tl.float32)
    dwv = tl.zeros([BQ * HIP], dtype=tl.float32)
    for s0 in range(lo, hi, BN):
        s = s0 + tl.arange(0, BN)
        smask = s < hi
        kt = _index_keys(k_idx, bb, T, s, smask, dd, DI)
        dv = _d_tile(d_ptr, line[:, None], s[None, :], _member(has, start, t, s, smask))
        u = tl.dot(qi, tl.trans(kt), input_precision=DOT_PREC)
        d_rows = tl.reshape(tl.broadcast_to(dv[:, None, :], [BQ, HIP, BN]), [BQ * HIP, BN])
        du = tl.where(u > 0.0, d_rows * wv[:, None], 0.0)
        dwv += tl.sum(relu_nan(u) * d_rows, axis=1)
        dqi += tl.dot(du.to(kt.dtype), kt, input_precision=DOT_PREC)
    gscale = tl.load(gscale_ptr)
    # only the chunk's rows: those past it belong to a later chunk or to rows without keys
    ivalid = ivalid & (t0 + tl.arange(0, BQ * HIP) // HIP < R0 + NR)
    tl.store(dq_idx + irow[:, None] * DI + dd[None, :], (dqi * gscale).to(dq_idx.dtype.element_ty),
             mask=imask & ivalid[:, None])
    tl.store(dw + irow, (dwv * gscale).to(dw.dtype.element_ty), mask=ivalid)


@triton.jit(do_not_specialize=["T", "R0", "NR", "W", "bb"])
def dense_kl_kernel_dk(q_idx, w, k_idx, start_ptr, d_ptr, gscale_ptr, dk32, T, R0, NR, W, bb,
                       HI: tl.constexpr, HIP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
                       BQ: tl.constexpr, BN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Program (tile of BN keys below the chunk's end): walks the chunk's blocks of BQ tokens that
    reach its keys; per block u^T = k_idx q_idx^T over the stacked (token, head) rows,
    du^T = d^T w [u > 0], dk += du^T q_idx; then adds dk * gscale to its rows of dk32 (fp32)."""
    s0 = tl.program_id(0) * BN
    s = s0 + tl.arange(0, BN)
    end = R0 + NR
    smask = s < end
    dd = tl.arange(0, DIP)
    kt = _index_keys(k_idx, bb, T, s, smask, dd, DI)
    dk = tl.zeros([BN, DIP], dtype=tl.float32)
    for t0 in range(tl.maximum(R0, (s0 // BQ) * BQ), end, BQ):
        t = t0 + tl.arange(0, BQ)
        tvalid = t < end
        start = tl.load(start_ptr + (bb * T + tl.minimum(t, T - 1)).to(tl.int64), mask=tvalid,
                        other=0)
        has = tvalid & (start <= t) & (start < s0 + BN) & (t >= s0)
        if tl.max(has.to(tl.int32), axis=0) > 0:
            member = tl.trans(_member(has, start, t, s, smask))  # [keys, rows]
            dv = _d_tile(d_ptr, ((t - R0).to(tl.int64) * W)[None, :], s[:, None], member)
            qi, wv, irow, imask, ivalid = _load_indexer_rows(q_idx, w, bb, t0, T, HI, DI, DIP, BQ,
                                                             HIP)
            u = tl.dot(kt, tl.trans(qi), input_precision=DOT_PREC)
            d_cols = tl.reshape(tl.broadcast_to(dv[:, :, None], [BN, BQ, HIP]), [BN, BQ * HIP])
            du = tl.where(u > 0.0, d_cols * wv[None, :], 0.0)
            dk += tl.dot(du.to(qi.dtype), qi, input_precision=DOT_PREC)
    gscale = tl.load(gscale_ptr)
    ptr = dk32 + ((bb * T + s).to(tl.int64) * DI)[:, None] + dd[None, :]
    kmask = smask[:, None] & (dd[None, :] < DI)
    tl.store(ptr, tl.load(ptr, mask=kmask, other=0.0) + dk * gscale, mask=kmask)


# the GPU's row-chunk budget for d and its lse_I key segment, which parallel/memory.py counts too
GPU_CHUNK_BYTES = 512 << 20
GPU_KEY_SEGMENT = 1024


def _config(device: torch.device) -> dict:
    """Tiles. Interpreter: small (cost is per op). GPU (sm_90, the benchmark's shapes; bench/sweep_dsa.py
    --only loss_dense_tiles on an H200, ms at 32K): the d kernel on 64 x 128 tiles with 8 warps and 3
    stages (64-key tiles 55.5, 4 warps spill; it spills 48 bytes as it is), key segments of 1,024 (4,096:
    +1.6), dq on 4-token blocks with 4 warps (8 tokens / 8 warps +5), dk on 8-token blocks of 64 keys
    (4 / 128: +4); lse_I on 128 x 128 tiles (-1.2), dq with 3 stages (-1.0), the attention lse on
    128 x 128 tiles with 2 stages (13.2 ms; 3 stages 14.8). Registers and spills:
    `python -m kernels.dsa.aot_check --only dense_kl`."""
    if interpreting() or device.type != "cuda":
        return dict(BM_att=16, BN_att=32, warps_att=4, stages_att=1, BM_lse=16, BN_lse=32, BM_d=16,
                    BN_d=32, BQ_dq=4, BN_dq=32, BQ_dk=4, BN_dk=32, KS=64, warps_lse=4, warps_d=4,
                    warps_dq=4, warps_dk=4, stages_lse=1, stages_d=1, stages_dq=1, stages_dk=1,
                    chunk_bytes=1 << 20)
    return dict(BM_att=128, BN_att=128, warps_att=8, stages_att=2, BM_lse=128, BN_lse=128, BM_d=64,
                BN_d=128, BQ_dq=4, BN_dq=64, BQ_dk=8, BN_dk=64, KS=GPU_KEY_SEGMENT, warps_lse=8,
                warps_d=8, warps_dq=4, warps_dk=4, stages_lse=2, stages_d=3, stages_dq=3, stages_dk=2,
                chunk_bytes=GPU_CHUNK_BYTES)


MAX_SEGMENTS = 64


def lse_i_segments(T: int, ks: int) -> tuple[int, int]:
    """(keys per segment, segments) of lse_I's key split for T keys: `ks` keys (the grid's second axis,
    which short sequences need to fill the GPU), but at most MAX_SEGMENTS segments, so that the fp32
    partials (4 B per row and segment) stay 256 B per row instead of growing with T (on an H200 at
    128K, 1,024- / 2,048- / 4,096-key segments took 659.0 / 661.3 / 658.5 ms: the split does not matter
    there)."""
    ks = max(ks, pow2(triton.cdiv(T, MAX_SEGMENTS)))
    return ks, triton.cdiv(T, ks)


def _row_chunks(T: int, step: int, budget: int, rows=None) -> list[tuple[int, int]]:
    """[r0, r1) row chunks, each a multiple of `step` rows (but the last), whose d buffer
    rows x r1 elements stays within `budget` elements (at least `step` rows). rows: ascending,
    disjoint [lo, hi) ranges; then each chunk is cut to the rows of `rows` it holds (first to last)
    and left out if it holds none, so many short ranges (a rank's chunks of many documents) cost no
    more chunks than all rows would."""
    out, r0 = [], 0
    while r0 < T:
        # the largest R with R * (r0 + R) <= budget
        r = int((-r0 + math.sqrt(r0 * r0 + 4.0 * budget)) / 2)
        r = max(step, (r // step) * step)
        out.append((r0, min(T, r0 + r)))
        r0 += r
    if rows is None:
        return out
    rows = [(int(lo), int(hi)) for lo, hi in rows]
    if any(not 0 <= lo < hi <= T for lo, hi in rows) or any(a[1] > b[0] for a, b in zip(rows, rows[1:])):
        raise ValueError(f"rows must be ascending, disjoint, non-empty [lo, hi) ranges inside [0, {T}); "
                         f"got {rows[:8]}")
    cut = []
    for r0, r1 in out:
        first = bisect.bisect_right(rows, (r0, T + 1)) - 1   # the last range starting at or before r0
        first += first < 0 or rows[first][1] <= r0           # ...or the next one, if that ends before r0
        last = bisect.bisect_left(rows, (r1, -1)) - 1        # the last range starting before r1
        if first <= last:
            cut.append((max(r0, rows[first][0]), min(r1, rows[last][1])))
    return cut


def dense_attention_lse(q, k, scale: float, start, cfg: dict | None = None) -> torch.Tensor:
    """[B, T, Hq] fp32 lse of dense causal attention over each row's keys start..t (start int32
    [B*T]; a start past the row: -inf), one program per (row tile, query head)."""
    q, k = q.contiguous(), k.contiguous()
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    cfg = {**_config(q.device), **(cfg or {})}
    nbt = triton.cdiv(T, cfg["BM_att"])
    lse = torch.empty(B, T, HQ, dtype=torch.float32, device=q.device)
    dense_kl_kernel_lse[(B * nbt, HQ)](
        q, k, lse, start, T, nbt, scale * LOG2E, HQ=HQ, HKV=HKV, G=HQ // HKV, D=D, DP=pow2(D, 16),
        BM=cfg["BM_att"], BN=cfg["BN_att"], DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg["warps_att"], num_stages=cfg["stages_att"])
    return lse


def dense_kl_fwd_bwd(q_idx, w, k_idx, q, k, lse, start, scale: float, gscale=None,
                     cfg: dict | None = None, grad_dtype: torch.dtype | None = None, rows=None):
    """The dense stage's per-token KL [B*T] (fp32) and, with gscale (a 1-element fp32 tensor,
    d loss / d KL_t), the gradients (dq_idx, dw, dk_idx) in the inputs' dtypes; else None.
    q [B, T, Hq, D], k [B, T, Hkv, D], lse [B, T, Hq] fp32 (the dense attention's), q_idx
    [B, T, HI, DI], w [B, T, HI], k_idx [B, T, DI], start int32 [B*T] (each row's first key; a
    start past the row: no keys, KL 0). `cfg` overrides `_config` keys (the tile sweep). grad_dtype: the
    gradients' dtype instead of the inputs' (DenseKLLossFn keeps them in fp32 to scale them later).
    rows: host [lo, hi) ranges (ascending, disjoint) holding every row of each batch row that has
    keys; the KL and gradients of the other rows are 0 and their row chunks are not launched (a
    context-parallel rank's rows scattered to their global positions: most of them it does not hold).
    None: every row may have keys."""
    q_idx, w, k_idx, q, k, lse = (x.contiguous() for x in (q_idx, w, k_idx, q, k, lse))
    B, T, HQ, D = q.shape
    HKV = k.shape[2]
    HI, DI = q_idx.shape[2], q_idx.shape[3]
    dev = q.device
    cfg = {**_config(dev), **(cfg or {})}
    prec = dot_precision(q_idx.dtype)
    DIP, HIP = pow2(DI, 16), pow2(HI)
    KS, nseg = lse_i_segments(T, cfg["KS"])
    # 1. lse_I, per key segment, merged here
    bm = cfg["BM_lse"]
    nbt = triton.cdiv(T, bm)
    part = torch.empty(B * T, nseg, dtype=torch.float32, device=dev)
    dense_kl_kernel_lse_i[(B * nbt, nseg)](
        q_idx, w, k_idx, start, part, T, nbt, nseg, KS, HI=HI, DI=DI, DIP=DIP, BM=bm,
        BN=cfg["BN_lse"], DOT_PREC=prec, num_warps=cfg["warps_lse"], num_stages=cfg["stages_lse"])
    lse_i = torch.logsumexp(part, dim=1)
    lse_i = torch.where(torch.isfinite(lse_i), lse_i, torch.zeros_like(lse_i))
    # rows outside `rows` are never written: zeros for them (KL 0, no gradient)
    new = torch.empty if rows is None else torch.zeros
    sums = new(B * T, 3, dtype=torch.float32, device=dev)  # per row: sum P log P, sum P, sum P I
    grads = None
    if gscale is not None:
        dq_idx = new(q_idx.shape, dtype=grad_dtype or q_idx.dtype, device=dev)
        dw = new(w.shape, dtype=grad_dtype or w.dtype, device=dev)
        dk32 = torch.zeros(B * T, DI, dtype=torch.float32, device=dev)
        grads = (dq_idx, dw, dk32)
    step = math.lcm(cfg["BM_d"], cfg["BQ_dq"], cfg["BQ_dk"])
    chunks = _row_chunks(T, step, max(1, cfg["chunk_bytes"] // 4), rows)
    for bb in range(B):
        for r0, r1 in chunks:
            nr = r1 - r0
            width = triton.cdiv(r1, 16) * 16
            dbuf = torch.empty(nr * width if grads is not None else 1, dtype=torch.float32, device=dev)
            part_d = torch.empty(nr, nseg, 3, dtype=torch.float32, device=dev)
            dense_kl_kernel_d[(triton.cdiv(nr, cfg["BM_d"]), nseg)](
                q, k, lse, q_idx, w, k_idx, start, lse_i, dbuf, part_d, T, r0, nr, width, nseg, KS, bb,
                scale * LOG2E, 1.0 / HQ, HQ=HQ, HKV=HKV, G=HQ // HKV, D=D, DP=pow2(D, 16), HI=HI,
                DI=DI, DIP=DIP, BM=cfg["BM_d"], BN=cfg["BN_d"], STORE_D=grads is not None,
                DOT_PREC=prec, num_warps=cfg["warps_d"], num_stages=cfg["stages_d"])
            torch.sum(part_d, dim=1, out=sums[bb * T + r0:bb * T + r1])
            if grads is None:
                continue
            dense_kl_kernel_dq[(triton.cdiv(nr, cfg["BQ_dq"]),)](
                q_idx, w, k_idx, start, dbuf, gscale, dq_idx, dw, T, r0, nr, width, bb, HI=HI, HIP=HIP,
                DI=DI, DIP=DIP, BQ=cfg["BQ_dq"], BN=cfg["BN_dq"], DOT_PREC=prec,
                num_warps=cfg["warps_dq"], num_stages=cfg["stages_dq"])
            dense_kl_kernel_dk[(triton.cdiv(r1, cfg["BN_dk"]),)](
                q_idx, w, k_idx, start, dbuf, gscale, dk32, T, r0, nr, width, bb, HI=HI, HIP=HIP,
                DI=DI, DIP=DIP, BQ=cfg["BQ_dk"], BN=cfg["BN_dk"], DOT_PREC=prec,
                num_warps=cfg["warps_dk"], num_stages=cfg["stages_dk"])
    # per row KL = A/Z - log Z - B/Z + lse_I, 0 for a row without keys (indexer_loss._kl_value's formula)
    a, z, b = sums.unbind(1)
    z_safe = torch.where(z > 0, z, torch.ones_like(z))
    kl = torch.where(z > 0, a / z_safe - torch.log(z_safe) - b / z_safe + lse_i, torch.zeros_like(z))
    if grads is not None:
        grads = (dq_idx, dw, dk32.view(B, T, DI).to(grad_dtype or k_idx.dtype))
    return kl, grads


class DenseKLLossFn(torch.autograd.Function):
    """Mean over tokens of the dense stage's KL; gradients into q_idx, w, k_idx only. The forward
    computes them too (one pass yields both) and keeps them in fp32, so that the backward's scaling
    by the incoming gradient (e.g. a context-parallel rank's rows-to-mean factor 1.5) rounds once, to
    the inputs' dtype."""

    @staticmethod
    def forward(ctx, q_idx, w, k_idx, q, k, lse, start, scale: float, rows=None):
        n = q_idx.shape[0] * q_idx.shape[1]
        gscale = torch.full((1,), 1.0 / n, dtype=torch.float32, device=q.device)
        kl, grads = dense_kl_fwd_bwd(q_idx, w, k_idx, q, k, lse, start, scale, gscale,
                                     grad_dtype=torch.float32, rows=rows)
        ctx.save_for_backward(*grads)
        ctx.dtypes = (q_idx.dtype, w.dtype, k_idx.dtype)
        return kl.sum() / n

    @staticmethod
    def backward(ctx, grad):
        grads = [None if not need else (g * grad.float()).to(dt)
                 for g, need, dt in zip(ctx.saved_tensors, ctx.needs_input_grad[:3], ctx.dtypes)]
        return (*grads, None, None, None, None, None, None)


def dense_kl_loss(q_idx, w, k_idx, q, k, lse, start, scale: float, rows=None) -> torch.Tensor:
    """The dense stage's mean KL, through DenseKLLossFn when a gradient can be asked of it, else the
    KL alone (no gradients taken). rows: as dense_kl_fwd_bwd's."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q_idx, w, k_idx)):
        return DenseKLLossFn.apply(q_idx, w, k_idx, q, k, lse, start, scale, rows)
    kl, _ = dense_kl_fwd_bwd(q_idx, w, k_idx, q, k, lse, start, scale, rows=rows)
    return kl.sum() / kl.numel()


def indexer_kl_dense(q_idx, w, k_idx, q, k, start, scale: float, grad: float | None = None,
                     rows=None):
    """The dense stage's KL, mean over the B*T rows, for rows whose first eligible key is start
    (int32 [B*T]; a row whose start lies past the row has no keys and adds 0 to the sum, which is how
    a context-parallel rank leaves out the rows it does not hold). q and k are constants.
    grad None: the loss with its autograd backward (dense_kl_loss).
    grad a float: back-propagated at once into those of q_idx, w and k_idx that require grad, with
    d(total)/d(loss) = grad; the loss is returned detached. rows: the host ranges of the rows with
    keys, if known (dense_kl_fwd_bwd)."""
    q, k = q.detach(), k.detach()
    lse = dense_attention_lse(q, k, scale, start)
    if grad is None:
        return dense_kl_loss(q_idx, w, k_idx, q, k, lse, start, scale, rows)
    n = q_idx.shape[0] * q_idx.shape[1]
    gscale = torch.full((1,), float(grad) / n, dtype=torch.float32, device=q.device)
    kl, grads = dense_kl_fwd_bwd(q_idx.detach(), w.detach(), k_idx.detach(), q, k, lse, start, scale,
                                 gscale, rows=rows)
    pairs = [(x, g) for x, g in zip((q_idx, w, k_idx), grads) if x.requires_grad]
    if pairs:
        torch.autograd.backward([x for x, _ in pairs], [g for _, g in pairs])
    return kl.sum() / n
