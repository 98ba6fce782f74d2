"""Streaming top-k selection over the DSA lightning-indexer scores (Triton).

Shape legend: B batch, T tokens, HI indexer heads, DI indexer dim, K top-k, CAP candidate slots per
row, M threshold samples per row. A "row" is one query token (flattened b * T + t); a "slot" is a
row's place in the current launch (blocks of BT consecutive tokens).

No [T, T] score matrix ever exists. The query blocks are taken in chunks bounded by `chunk_bytes`;
per chunk, the default (`mode="stored"`) runs three kernels:

1. `topk_fwd_kernel_score` scores the chunk's rows that have more than K eligible keys against
   their causal / document key range and writes the fp32 scores into a [rows, T] slab (the only
   pass over the L^2/2 scores). Programs are (64-row tile, key split, batch row); each holds its
   16 per-head query tiles in shared memory and streams key tiles through [64, DI] x [DI, 128]
   tensor-core dots (ReLU, weight, summed in a fixed head order).
2. `topk_fwd_kernel_compact` (one program per row) takes the row's threshold tau from M stratified
   pseudo-random samples of its stored scores (the order statistic expected to leave about
   (K + CAP) / 2 keys; -inf when n <= CAP, nothing when n <= K), then streams the row once and
   appends every key with score >= tau to its candidate list (positions ascending, at most CAP
   stored, all counted).
3. `topk_fwd_kernel_select` (R rows per program): exact top-K among the candidates: bisection
   over the order-preserving int32 image of the fp32 scores finds the K-th largest value; ties at
   that value are taken in ascending position (the candidates are stored in that order); output
   positions ascending, written SUB candidates at a time. Rows whose candidate count fell outside
   [K, CAP] are flagged.

`mode="fused"` (kept, tested, and the path of the exact fallback) never stores scores: per chunk,
`topk_fwd_kernel_sample` scores M sample keys shared by a block's 16 rows, `topk_fwd_kernel_tau`
takes the threshold, and `topk_fwd_kernel_filter` recomputes the scores 16 rows at a time and
appends survivors as it goes, before the same select. Its 16-row tiles (the append's registers
leave no room for more) run the scoring at about half the stored path's tensor-core rate.

NaN: a NaN index score (a NaN in the indexer's inputs; the scores' ReLU keeps it, common.relu_nan, as
torch.relu does) ranks as -inf, as in naive.topk_indices: such a key is chosen last, ties in ascending position, so every row still selects min(K, eligible) keys of
its own range. (A NaN compares false against any threshold, which left a row fewer candidates than
K and its output unwritten: positions read from uninitialised memory.) The threshold samples leave
NaN scores out, and the candidate passes store them as -inf (`_nan_low`: kept when tau = -inf).

Flagged rows (rare: the sample estimate was off, or massive ties) are redone exactly: the filter
runs again for their blocks with tau = -inf and room for the whole prefix, then
`topk_fwd_kernel_select_long` streams the same bisection over the long list. The result is always
the exact top-K of the kernel's fp32 scores. R = 1 on the GPU; the interpreter, whose cost is per
operation whatever the tile size, batches 16 rows per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, interpreting, pow2, relu_nan, row_doc_start

INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _nan_low(x):
    """A NaN score as -inf (NaN in the module docstring): kept by a threshold of -inf alone. Applied
    where scores enter the candidate lists, so the lists (and the select kernels) never hold a NaN."""
    return tl.where(x == x, x, float("-inf"))


@triton.jit
def _ordered_key(x):
    """fp32 -> int32 whose signed order is the float order (callers map -0.0 to +0.0 and NaN to
    -inf first: `_key_tile_scores`, `_nan_low`)."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _hash(a, b):
    """Deterministic 31-bit mix of two integers (sample positions inside a stratum)."""
    x = (a.to(tl.int64) * 1103515245 + b.to(tl.int64) * 12345 + 2531011) & 0x7FFFFFFF
    x = x ^ (x >> 15)
    x = (x * 1540483477) & 0x7FFFFFFF
    x = x ^ (x >> 13)
    return x


@triton.jit
def _block_rows(blk_ptr, start_ptr, p, T, NBT, BT: tl.constexpr):
    """The BT query rows of the block program p works on: (batch row b, row index i, position t,
    t < T, flat row b * T + t, document start of t); `_slot_rows` is the one-row-per-slot form."""
    blk = tl.load(blk_ptr + p)
    bb = blk // NBT
    i = tl.arange(0, BT)
    t = (blk % NBT) * BT + i
    tvalid = t < T
    row = (bb * T + tl.minimum(t, T - 1)).to(tl.int64)
    start = tl.load(start_ptr + row, mask=tvalid, other=0)
    return bb, i, t, tvalid, row, start


@triton.jit
def _index_scores(q_idx, w, row, tvalid, kt, dd, dmask, HI: tl.constexpr, DI: tl.constexpr,
                  DOT_PREC: tl.constexpr, ROW_MASK: tl.constexpr, DIP: tl.constexpr):
    """I[row, key] of the rows [BT] against the gathered index keys kt [N, DIP]: per indexer head a
    [BT, DI] x [DI, N] dot, ReLU, weight, summed in a fixed head order, so the sample, filter and
    fallback passes compute bit-identical fp32 scores. ROW_MASK=False loads the query rows and
    weights unmasked (every row index must be a real row; the caller ignores rows outside tvalid):
    topk_fwd_kernel_score's per-element row masks spilled registers."""
    score = tl.zeros([row.shape[0], kt.shape[0]], dtype=tl.float32)
    for j in tl.static_range(HI):
        q_ptr = q_idx + (row * HI + j)[:, None] * DI + dd[None, :]
        if ROW_MASK:
            qj = tl.load(q_ptr, mask=tvalid[:, None] & dmask[None, :], other=0.0)
            wj = tl.load(w + row * HI + j, mask=tvalid, other=0.0).to(tl.float32)
        else:
            if DIP == DI:
                qj = tl.load(q_ptr)
            else:
                qj = tl.load(q_ptr, mask=dmask[None, :], other=0.0)
            wj = tl.load(w + row * HI + j).to(tl.float32)
        u = tl.dot(qj, tl.trans(kt), input_precision=DOT_PREC)
        score += relu_nan(u) * wj[:, None]
    return score


@triton.jit
def _key_tile_scores(q_idx, w, k_idx, row, rmask, bb, T, s0, hi, dd, dmask, HI: tl.constexpr,
                     DI: tl.constexpr, DOT_PREC: tl.constexpr, ROW_MASK: tl.constexpr,
                     DIP: tl.constexpr, BN: tl.constexpr):
    """Key tile [s0, s0 + BN) of batch row bb (keys from hi on masked): its positions, their
    mask, and the rows' index scores against it (-0.0 mapped to +0.0: see _ordered_key); shared by
    the fused filter and the stored path's score kernel, so both compare the same fp32 scores."""
    s = s0 + tl.arange(0, BN)
    smask = s < hi
    kt = tl.load(k_idx + ((bb * T + s).to(tl.int64) * DI)[:, None] + dd[None, :],
                 mask=smask[:, None] & dmask[None, :], other=0.0)
    score = _index_scores(q_idx, w, row, rmask, kt, dd, dmask, HI, DI, DOT_PREC, ROW_MASK, DIP)
    return s, smask, tl.where(score == 0.0, 0.0, score)


@triton.jit
def _kth_largest_key(keys, kth):
    """Per row of keys [R, N] (invalid entries INT32_MIN: no ordered key of a non-NaN float is,
    -inf maps to INT32_MIN + 0x7FFFFF, so no validity mask stays live through the loop): the
    largest int32 v with #{keys >= v} >= kth (kth scalar or [R]; rows with fewer than kth valid
    keys return INT32_MIN). Bisection between the row's smallest valid key (count >= kth) and its
    largest + 1 (count 0): log2 of the keys' span in halvings, at most 32."""
    big = tl.full(keys.shape, 2147483647, tl.int32)
    valid = keys != INT32_MIN
    ok = tl.sum(valid.to(tl.int32), axis=1) >= kth
    lo = tl.where(ok, tl.min(tl.where(valid, keys, big), axis=1).to(tl.int64), INT32_MIN)
    hi = tl.where(ok, tl.max(keys, axis=1).to(tl.int64) + 1, INT32_MIN + 1)
    while tl.max(hi - lo, axis=0) > 1:
        mid = (lo + hi) >> 1
        cnt = tl.sum((keys >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1)
        take = cnt >= kth
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid)
    return lo.to(tl.int32)


@triton.jit
def _sample_tau(sc, valid, n, M, TARGET):
    """Per row of M sample scores sc [R, MP] (valid [R, MP]) of a row with n eligible keys (scalar
    or [R], int64): the sample order statistic expected to leave about TARGET of the n keys."""
    valid = valid & (sc == sc)  # a NaN sample says nothing of the finite scores' spread
    keys = tl.where(valid, _ordered_key(sc), INT32_MIN)
    r_k = tl.minimum(tl.maximum((M * TARGET.to(tl.int64) + n - 1) // n, 1), M)
    kth = _kth_largest_key(keys, r_k.to(tl.int32))
    return tl.max(tl.where(valid & (keys == kth[:, None]), sc, float("-inf")), axis=1)


@triton.jit
def _slot_rows(blk_ptr, start_ptr, slot, NSLOT, T, NBT, BT: tl.constexpr):
    """Launch slots -> (live, flattened row, start of its document, #eligible keys)."""
    smask = slot < NSLOT
    blk = tl.load(blk_ptr + slot // BT, mask=smask, other=0)
    bb = blk // NBT
    t = (blk % NBT) * BT + slot % BT
    live = smask & (t < T)
    row = (bb * T + tl.minimum(t, T - 1)).to(tl.int64)
    start = tl.load(start_ptr + row, mask=live, other=0)
    return live, row, start, t - start + 1


@triton.jit(do_not_specialize=["T", "NBT", "CAP", "M"])
def topk_fwd_kernel_sample(q_idx, w, k_idx, start_ptr, blk_ptr, scratch_ptr, T, NBT, CAP, M,
                           HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
                           BT: tl.constexpr, SB: tl.constexpr, MP: tl.constexpr,
                           DOT_PREC: tl.constexpr):
    """Scores of M stratified pseudo-random sample keys for the BT rows of one query block.

    The rows share the sample: positions spread over the eligible prefix of the block's first row
    that needs a threshold (more than CAP eligible keys; n0 of them), s0 + (j * n0 + hash(that row,
    j) % n0) // M. When CAP >= BT all such rows of the block belong to that row's document (a
    document starting inside the block has at most BT keys), so every sampled key is eligible for
    them; each [BT, DI] x [DI, SB] dot reuses one gathered key tile for BT rows. Rows of another
    document (possible only when CAP < BT) get no valid sample (-inf scores) and end in the exact
    fallback; rows not held by this rank under context parallelism have no keys and need none."""
    p = tl.program_id(0)
    bb, i, t, tvalid, row, start = _block_rows(blk_ptr, start_ptr, p, T, NBT, BT)
    est = tvalid & (t - start + 1 > CAP)
    if tl.max(est.to(tl.int32), axis=0) > 0:
        t0 = tl.min(tl.where(est, t, T), axis=0)
        row0 = bb * T + t0
        s0 = tl.load(start_ptr + row0)
        n0 = (t0 - s0 + 1).to(tl.int64)
        same = est & (start == s0)
        dd = tl.arange(0, DIP)
        dmask = dd < DI
        for j0 in range(0, M, SB):
            j = j0 + tl.arange(0, SB)
            jm = j < M
            pos = s0 + (j.to(tl.int64) * n0 + _hash(row0, j) % n0) // M
            kt = tl.load(k_idx + ((bb * T + pos) * DI)[:, None] + dd[None, :],
                         mask=jm[:, None] & dmask[None, :], other=0.0)
            sc = _index_scores(q_idx, w, row, tvalid, kt, dd, dmask, HI, DI, DOT_PREC, True, DIP)
            sc = tl.where(same[:, None], sc, float("-inf"))
            tl.store(scratch_ptr + (p * BT + i).to(tl.int64)[:, None] * MP + j[None, :], sc,
                     mask=est[:, None] & jm[None, :])


@triton.jit(do_not_specialize=["NSLOT", "T", "NBT", "K", "CAP", "M", "TARGET"])
def topk_fwd_kernel_tau(start_ptr, blk_ptr, tau_ptr, scratch_ptr, NSLOT, T, NBT, K, CAP, M, TARGET,
                        BT: tl.constexpr, MP: tl.constexpr, R: tl.constexpr):
    """Row threshold tau: +inf (n <= K: keep nothing), -inf (n <= CAP: keep all), or the sample
    order statistic expected to leave about TARGET of the row's n keys (n > CAP). R rows per
    program; the sample scores come from topk_fwd_kernel_sample."""
    slot = tl.program_id(0) * R + tl.arange(0, R)
    live, row, start, n = _slot_rows(blk_ptr, start_ptr, slot, NSLOT, T, NBT, BT)
    est = live & (n > CAP)
    tau = tl.where(live & (n > K), float("-inf"), float("inf"))
    if tl.max(est.to(tl.int32), axis=0) > 0:
        n_safe = tl.maximum(n, 1).to(tl.int64)
        jj = tl.arange(0, MP)
        valid = est[:, None] & (jj[None, :] < M)
        sc = tl.load(scratch_ptr + slot.to(tl.int64)[:, None] * MP + jj[None, :], mask=valid,
                     other=0.0)
        valid = valid & (sc > float("-inf"))
        sc = tl.where(sc == 0.0, 0.0, sc)
        tau = tl.where(est, _sample_tau(sc, valid, n_safe, M, TARGET), tau)
    tl.store(tau_ptr + slot, tau, mask=slot < NSLOT)


@triton.jit(do_not_specialize=["T", "NBT", "CAP"])
def topk_fwd_kernel_filter(q_idx, w, k_idx, start_ptr, blk_ptr, tau_ptr, cnt_ptr,
                           cand_s_ptr, cand_p_ptr, T, NBT, CAP,
                           HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
                           BT: tl.constexpr, BS: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program per BT query rows: the single streamed pass over the causal scores; appends
    keys with score >= tau (ascending positions) to each row's candidate list."""
    p = tl.program_id(0)
    bb, i, t, tvalid, row, start = _block_rows(blk_ptr, start_ptr, p, T, NBT, BT)
    tau = tl.load(tau_ptr + p * BT + i)
    active = tvalid & (tau < float("inf"))
    # Sentinel T, not INT32_MAX: on the GPU the software pipeliner issues the first tile's loads
    # before testing the loop bound, and INT32_MAX + arange(BS) wrapped to negative positions that
    # passed the `s < hi` mask (an out-of-bounds read found by compute-sanitizer on an H200).
    lo = tl.min(tl.where(active, start, T), axis=0)
    hi = tl.max(tl.where(active, t + 1, 0), axis=0)
    lo = (lo // BS) * BS
    dd = tl.arange(0, DIP)
    dmask = dd < DI
    cnt = tl.zeros([BT], dtype=tl.int32)
    cand_row = (p * BT + i).to(tl.int64) * CAP
    for s0 in range(lo, hi, BS):
        s, smask, score = _key_tile_scores(q_idx, w, k_idx, row, tvalid, bb, T, s0, hi, dd, dmask,
                                           HI, DI, DOT_PREC, True, DIP, BS)
        elig = active[:, None] & (s[None, :] <= t[:, None]) & (s[None, :] >= start[:, None])
        score = _nan_low(score)
        keep = elig & (score >= tau[:, None])
        kc = keep.to(tl.int32)
        dest = cnt[:, None] + tl.cumsum(kc, axis=1) - 1
        smask2 = keep & (dest < CAP)
        tl.store(cand_s_ptr + cand_row[:, None] + dest, score, mask=smask2)
        tl.store(cand_p_ptr + cand_row[:, None] + dest, s[None, :] + 0 * dest, mask=smask2)
        cnt += tl.sum(kc, axis=1)
    tl.store(cnt_ptr + p * BT + i, cnt)


@triton.jit
def _st_global_v2_f32(base, off, val, ok):
    """st.global of val to base + 4 * off where ok, as a pure elementwise op returning 0s.

    Pure, so the compiler does not treat it as a memory write: a tl.store inside the key loop of
    topk_fwd_kernel_score kept the loop-invariant query-tile loads from being hoisted (they could
    alias the store), which left them reloaded every tile and the loop unpipelined. The caller
    consumes the returned zeros so the op is not removed; nothing reads the buffer until the next
    kernel. Pairs: Triton hands pack=2 asm the two adjacent columns a thread holds in the MMA
    accumulator layout (c, c + 1 with c even), stored as one 8-byte st.v2 at base + 4 * off of
    the first, under the first's ok (one fp32 per store materialised an address per element and
    spilled at 128-key tiles). The caller keeps off of the first even (even row stride and tile
    start) and leaves room for the second."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b64 a; setp.ne.b32 p, $8, 0; mad.wide.s32 a, $4, 4, $2; "
        "@p st.global.v2.f32 [a], {$6, $7}; mov.u32 $0, 0; mov.u32 $1, 0; }",
        "=r,=r,l,l,r,r,f,f,r,r", [base.to(tl.int64, bitcast=True), off, val, ok.to(tl.int32)],
        dtype=tl.int32, is_pure=True, pack=2)


@triton.jit(do_not_specialize=["NSLOT", "T", "NBT", "K", "NROW", "W"])
def topk_fwd_kernel_score(q_idx, w, k_idx, start_ptr, blk_ptr, buf_ptr, NSLOT, T, NBT, K, NROW,
                          W, HI: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
                          BT: tl.constexpr, RS: tl.constexpr, BN: tl.constexpr, KS: tl.constexpr,
                          STORE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Stored-score selection, step 1: program (i, j, b) scores the RS launch slots i * RS.. of
    batch row b (rows with more than K eligible keys) against keys [j * KS, (j + 1) * KS) of
    their causal / document ranges and writes the fp32 scores to buf[slot, key] (row stride W,
    T rounded up to even). STORE: 0 tl.store, 2 the pure inline-asm st.global of adjacent fp32
    pairs (see _st_global_v2_f32; pairs need BN and W even, which the wrapper ensures).
    Wide row tiles keep the 16 per-head dots on the tensor cores; nothing is compared here."""
    slot = tl.program_id(0) * RS + tl.arange(0, RS)
    b = tl.program_id(2)
    live, row, start, n = _slot_rows(blk_ptr, start_ptr, slot, NSLOT, T, NBT, BT)
    need = live & (n > K) & (row // T == b)
    t = start + n - 1
    k0 = tl.program_id(1) * KS
    lo = tl.maximum((tl.min(tl.where(need, start, T), axis=0) // BN) * BN, k0)
    hi = tl.minimum(tl.max(tl.where(need, t + 1, 0), axis=0), k0 + KS)
    dd = tl.arange(0, DIP)
    dmask = dd < DI
    # Register pressure (sm_90, 8 warps): per-element row masks on the q loads or the store, or
    # [RS, BN] 64-bit addresses, spilled. So q and w load unmasked (ROW_MASK=False: every slot
    # maps to a real row), the store is masked by key only, at int32 offsets from a per-tile scalar base (the
    # wrapper keeps (rows + 1) * W < 2^31), and rows this program must not write (another batch
    # row, or no threshold needed) go to the spare line `NROW` of the buffer. A row's line is
    # written over the tile's whole key range; the compact kernel reads only [start, t].
    dst = tl.where(need, slot, NROW)
    sink = tl.zeros([RS], dtype=tl.int32)
    for s0 in range(lo, hi, BN):
        s, smask, score = _key_tile_scores(q_idx, w, k_idx, row, need, b, T, s0, hi, dd, dmask,
                                           HI, DI, DOT_PREC, False, DIP, BN)
        off = (dst * W)[:, None] + tl.arange(0, BN)[None, :]
        if STORE == 2:  # a pair past hi (odd hi) lands in this row's own line, below W
            sink |= tl.max(_st_global_v2_f32(buf_ptr + s0, off, score, smask[None, :]), axis=1)
        else:
            tl.store(buf_ptr + s0 + off, score, mask=smask[None, :])
    if STORE > 0:  # always 0: keeps the pure stores alive
        tot = tl.sum(sink, axis=0)
        tl.store(buf_ptr + NROW.to(tl.int64) * W, tot.to(tl.float32), mask=tot != 0)


@triton.jit
def _st_global_b32(base, off, val, ok):
    """st.global of one 32-bit val (fp32 or int32) to base + 4 * off where ok, as a pure op
    returning 0 (see _st_global_v2_f32: the compiler's coalescing pass leaves it alone, so a
    scattered store does not force the data into another register layout)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b64 a; setp.ne.b32 p, $4, 0; mad.wide.s32 a, $2, 4, $1; "
        "@p st.global.b32 [a], $3; mov.u32 $0, 0; }",
        "=r,l,r,r,r", [base.to(tl.int64, bitcast=True), off, val.to(tl.int32, bitcast=True),
                       ok.to(tl.int32)], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit(do_not_specialize=["NSLOT", "T", "NBT", "K", "CAP", "M", "TARGET"])
def topk_fwd_kernel_compact(start_ptr, blk_ptr, buf_ptr, cnt_ptr, cand_s_ptr, cand_p_ptr,
                            NSLOT, T, NBT, K, CAP, M, TARGET, W,
                            BT: tl.constexpr, MP: tl.constexpr, BC: tl.constexpr,
                            STORE: tl.constexpr, PF: tl.constexpr = 0):
    """Stored-score selection, step 2 (one program per launch slot): the row's threshold tau from
    M stratified pseudo-random samples of its stored scores (the order statistic expected to leave
    about TARGET keys; -inf when n <= CAP), then one streamed pass over the stored scores that
    appends every key with score >= tau (ascending positions, at most CAP stored, all counted).
    The pass reads BC-key tiles from the row's start rounded down to 4 (keys outside the row's
    range are masked after the load), so with the row stride W a multiple of 16 (specialised) the
    loads are 16-byte vectors. STORE: 0 tl.store; 1 the pure inline-asm st.global (the
    compiler's store coalescing moved the scattered appends, and with them the scores and masks,
    into another register layout through shared memory). PF = 1 loads the next tile before
    compacting this one (the stream is latency-bound: one row per program)."""
    slot = tl.program_id(0)
    live, row, start, n = _slot_rows(blk_ptr, start_ptr, slot, NSLOT, T, NBT, BT)
    cnt = tl.zeros([], dtype=tl.int32)
    if live & (n > K):
        base = buf_ptr + slot.to(tl.int64) * W
        tau = tl.full([], float("-inf"), tl.float32)
        if n > CAP:
            j = tl.arange(0, MP)
            jm = j < M
            n64 = n.to(tl.int64)
            pos = start + (j.to(tl.int64) * n64 + _hash(row, j) % n64) // M
            sc = tl.load(base + pos, mask=jm, other=0.0)
            tau = tl.max(_sample_tau(sc[None, :], jm[None, :], n64, M, TARGET), axis=0)
        cand = slot.to(tl.int64) * CAP
        end = start + n
        sink = tl.zeros([BC], dtype=tl.int32)
        first = (start // 4) * 4
        lim = ((end + 3) // 4) * 4  # <= W; a multiple of 4, so the masked loads stay 16-byte
        if PF == 1:
            sn = first + tl.arange(0, BC)
            sc_next = tl.load(base + sn, mask=sn < lim, other=0.0)
        for s0 in range(first, end, BC):
            s = s0 + tl.arange(0, BC)
            if PF == 1:  # the next tile's load is in flight while this one is compacted
                sc = sc_next
                sn = s + BC
                sc_next = tl.load(base + sn, mask=sn < lim, other=0.0)
            else:
                sc = tl.load(base + s, mask=s < W, other=0.0)
            sc = _nan_low(sc)
            keep = (s >= start) & (s < end) & (sc >= tau)
            kc = keep.to(tl.int32)
            dest = cnt + tl.cumsum(kc, axis=0) - 1
            m2 = keep & (dest < CAP)
            if STORE == 1:
                sink |= _st_global_b32(cand_s_ptr + cand, dest, sc, m2)
                sink |= _st_global_b32(cand_p_ptr + cand, dest, s, m2)
            else:
                tl.store(cand_s_ptr + cand + dest, sc, mask=m2)
                tl.store(cand_p_ptr + cand + dest, s, mask=m2)
            cnt += tl.sum(kc, axis=0)
        if STORE == 1:  # always 0: keeps the pure stores alive
            cnt += tl.max(sink, axis=0)
    tl.store(cnt_ptr + slot, cnt, mask=slot < NSLOT)


@triton.jit
def _top_k_of_candidates(cand_s_ptr, cand_p_ptr, out_row, base, good, c, K, CAP,
                         R: tl.constexpr, RB: tl.constexpr, SUB: tl.constexpr,
                         STORE: tl.constexpr):
    """topk_fwd_kernel_select's exact top-K of the `good` rows. The bisection holds only the
    candidates' keys (invalid ones INT32_MIN, so no validity mask stays live); the output pass
    re-reads the candidates SUB at a time (L1 / L2 hits) and writes the selected positions at
    running offsets; ties at the threshold are ranked by a running cumulative sum only when there
    are more of them than places left. 128 registers rather than the 217 of holding keys, masks,
    offsets and positions of whole rows at once (timings beside _config)."""
    jj = tl.arange(0, RB)
    ld = good[:, None] & (jj[None, :] < CAP)
    keys = _ordered_key(tl.load(cand_s_ptr + base[:, None] + jj[None, :], mask=ld, other=0.0))
    keys = tl.where(jj[None, :] < c[:, None], keys, INT32_MIN)
    thr = _kth_largest_key(keys, K)
    need = K - tl.sum((keys > thr[:, None]).to(tl.int32), axis=1)
    many_ties = tl.max(tl.sum((keys == thr[:, None]).to(tl.int32), axis=1) - need, axis=0) > 0
    written = tl.zeros([R], dtype=tl.int32)
    ties_seen = tl.zeros([R], dtype=tl.int32)
    sink = tl.zeros([R], dtype=tl.int32)
    c_max = tl.max(tl.where(good, c, 0), axis=0)
    for j0 in range(0, c_max, SUB):
        j = j0 + tl.arange(0, SUB)
        ldj = good[:, None] & (j[None, :] < CAP)
        kj = _ordered_key(tl.load(cand_s_ptr + base[:, None] + j[None, :], mask=ldj, other=0.0))
        vj = ldj & (j[None, :] < c[:, None])
        gt = vj & (kj > thr[:, None])
        tie = vj & (kj == thr[:, None])
        if many_ties:  # more ties than places: the first ones in position order
            sel = gt | (tie & (ties_seen[:, None] + tl.cumsum(tie.to(tl.int32), axis=1)
                               <= need[:, None]))
        else:
            sel = gt | tie
        dest = written[:, None] + tl.cumsum(sel.to(tl.int32), axis=1) - 1
        pos = tl.load(cand_p_ptr + base[:, None] + j[None, :], mask=ldj, other=0)
        if STORE == 1:
            sink |= tl.max(_st_global_b32(out_row[:, None], dest, pos, sel), axis=1)
        else:
            tl.store(out_row[:, None] + dest, pos, mask=sel)
        ties_seen += tl.sum(tie.to(tl.int32), axis=1)
        written += tl.sum(sel.to(tl.int32), axis=1)
    if STORE == 1:  # always 0: keeps the pure stores alive
        tl.store(out_row, sink, mask=sink != 0)


@triton.jit(do_not_specialize=["NSLOT", "T", "NBT", "K"])
def topk_fwd_kernel_select(start_ptr, blk_ptr, cnt_ptr, cand_s_ptr, cand_p_ptr, out_ptr, fail_ptr,
                           NSLOT, T, NBT, K, CAP,
                           BT: tl.constexpr, R: tl.constexpr, RB: tl.constexpr,
                           OB: tl.constexpr, STORE: tl.constexpr, SUB: tl.constexpr):
    """Exact top-K of each row's candidates (R rows per program, CAP <= RB), or the whole prefix
    for rows with n <= K. Rows whose candidate count left [K, CAP] are flagged in fail_ptr.
    The candidates' keys load as whole rows (CAP, a power of two, is specialised: 16-byte
    vectors) for the bisection; the output pass then re-reads them SUB at a time (see
    _top_k_of_candidates). STORE: 0 tl.store, 1 the pure inline-asm st.global for the scattered
    output (see topk_fwd_kernel_compact)."""
    slot = tl.program_id(0) * R + tl.arange(0, R)
    live, row, start, n = _slot_rows(blk_ptr, start_ptr, slot, NSLOT, T, NBT, BT)
    c = tl.load(cnt_ptr + slot, mask=live, other=0)
    short = live & (n <= K)
    long = live & (n > K)
    bad = long & ((c < K) | (c > CAP))
    good = long & (c >= K) & (c <= CAP)
    tl.store(fail_ptr + row, tl.full([R], 1, tl.int32), mask=bad)
    out_row = out_ptr + row * K
    for j0 in range(0, K, OB):  # short rows: the whole prefix, then -1
        j = j0 + tl.arange(0, OB)
        vals = tl.where(j[None, :] < n[:, None], start[:, None] + j[None, :], -1)
        tl.store(out_row[:, None] + j[None, :], vals, mask=short[:, None] & (j[None, :] < K))
    _top_k_of_candidates(cand_s_ptr, cand_p_ptr, out_row, slot.to(tl.int64) * CAP, good, c, K,
                         CAP, R, RB, SUB, STORE)


@triton.jit(do_not_specialize=["T", "NBT", "K", "CAP"])
def topk_fwd_kernel_select_long(start_ptr, blk_ptr, cnt_ptr, cand_s_ptr, cand_p_ptr, out_ptr,
                                T, NBT, K, CAP, BT: tl.constexpr, RB: tl.constexpr):
    """Fallback rows (one per program, list of any length): the same bisection and tie rule,
    streamed over the candidate list in RB chunks. Rows without exactly >= K candidates are
    left alone (they are not fallback rows)."""
    slot = tl.program_id(0)
    blk = tl.load(blk_ptr + slot // BT)
    bb = blk // NBT
    t = (blk % NBT) * BT + slot % BT
    row = (bb * T + tl.minimum(t, T - 1)).to(tl.int64)
    start = tl.load(start_ptr + row)
    c = tl.load(cnt_ptr + slot)
    if (t < T) & (t - start + 1 > K) & (c >= K) & (c <= CAP):
        base = slot.to(tl.int64) * CAP
        lo = tl.full([], INT32_MIN, tl.int64)
        hi = tl.full([], 2147483648, tl.int64)
        for _ in range(32):
            mid = ((lo + hi) >> 1).to(tl.int32)
            cnt = tl.zeros([], dtype=tl.int32)
            for j0 in range(0, c, RB):
                jj = j0 + tl.arange(0, RB)
                vm = jj < c
                keys = _ordered_key(tl.load(cand_s_ptr + base + jj, mask=vm, other=0.0))
                cnt += tl.sum((vm & (keys >= mid)).to(tl.int32), axis=0)
            take = cnt >= K
            lo = tl.where(take, mid.to(tl.int64), lo)
            hi = tl.where(take, hi, mid.to(tl.int64))
        thr = lo.to(tl.int32)
        n_gt = tl.zeros([], dtype=tl.int32)
        for j0 in range(0, c, RB):
            jj = j0 + tl.arange(0, RB)
            vm = jj < c
            keys = _ordered_key(tl.load(cand_s_ptr + base + jj, mask=vm, other=0.0))
            n_gt += tl.sum((vm & (keys > thr)).to(tl.int32), axis=0)
        need = K - n_gt
        ties_seen = tl.zeros([], dtype=tl.int32)
        written = tl.zeros([], dtype=tl.int32)
        for j0 in range(0, c, RB):
            jj = j0 + tl.arange(0, RB)
            vm = jj < c
            keys = _ordered_key(tl.load(cand_s_ptr + base + jj, mask=vm, other=0.0))
            gt = vm & (keys > thr)
            tie = vm & (keys == thr)
            sel = gt | (tie & (ties_seen + tl.cumsum(tie.to(tl.int32), axis=0) <= need))
            dest = written + tl.cumsum(sel.to(tl.int32), axis=0) - 1
            pos = tl.load(cand_p_ptr + base + jj, mask=vm, other=0)
            tl.store(out_ptr + row * K + dest, pos, mask=sel)
            ties_seen += tl.sum(tie.to(tl.int32), axis=0)
            written += tl.sum(sel.to(tl.int32), axis=0)


def _config(device: torch.device) -> dict:
    """Tile sizes. Under the interpreter every op costs ~0.1 ms whatever its size, so tiles are
    wide and several rows share a program; on the GPU one row per select / tau program."""
    if interpreting() or device.type != "cuda":
        # the interpreter defaults to the fused path: the stored path's compact kernel runs one row
        # per program (the GPU's best shape), ~4x slower here (tests/kernels/test_dsa.py T1000 case:
        # 50 vs 9 s); the kernel tests run every top-k case on both paths
        return dict(BT=32, BS=128, SB=128, R=16, warps_filter=4, warps_select=4, warps_sample=4,
                    stages_filter=1, mode="fused", RS=64, BN=128, KS=1024, BC=512,
                    warps_score=4, stages_score=1, store=0, warps_compact=4, asm_stores=0,
                    select_sub=1024, prefetch=1)
    # sm_90 (bench/sweep_dsa.py at 128K on an H200): the per-head filter over 64-key tiles with 4
    # warps, 151 ms, beats 128-key tiles with 8 warps (174 ms) and the stacked-rows (258 ms) and
    # keys-on-M (240 ms) score tiles tried in its place; 16 rows per program (32 rows: 281-303 ms,
    # 64 rows: out of shared memory). With the sample shared by a block's rows, all of top-k is
    # 134 ms (sampling 21 -> ~7 ms), 129 ms with 2 pipeline stages in the filter instead of 3, 125 ms
    # with 2 warps instead of 4 (1 warp: 467, 8: 237; 2 warps with 128-key tiles: 318).
    # Rejected: cap 4096 (261 fallback rows, 175 ms); the append offsets as a matmul with a
    # triangular ones matrix instead of tl.cumsum (no faster); reloading the 16 query tiles per
    # key tile instead of keeping them in registers (135 vs 134 ms); 32-key tiles (130 vs 125.6 ms;
    # 226 with 4 warps); 1 pipeline stage (145). Candidate chunks of 1 / 2 GiB instead of 512 MiB:
    # 124.0 / 123.3 ms, not worth 0.5 / 1.5 GiB more transient memory.
    # Stored scores (mode="stored"; bench/sweep_dsa.py --only topk at 128K, each against the fused
    # path in the same run): 82.6 ms with 1 GiB chunks (fused 124.4), 91.4 with 512 MiB (fused
    # 125.5), 78.7 with 2 GiB; 1 GiB is the default (2.7 rather than 1.4 waves of compact programs
    # per chunk; the union plan's transient is larger at 128K anyway). Score tiles 64 rows x 128
    # keys, 8 warps, 3 stages, key splits of 2048 (1024: 85.0, 4096: 83.0; 2 stages 87.9; 4 warps
    # 103.3), stored by a pure inline-asm st.global.v2 of each thread's adjacent column pair
    # (STORE=2): pure, so the compiler hoists the 16 query tiles into shared memory (a tl.store
    # in the loop could alias them: reloaded per key tile, unpipelined, 114.1 ms, STORE=0);
    # paired, so 128-key tiles fit in registers (one fp32 per asm store spilled at 128 keys; at
    # 64-key tiles 99.6 ms, pairs at 64 keys 87.4; removed). Rejected: the query tiles hoisted by hand
    # into a tuple (spills, 123-129 ms); one key tile per program with the loop over heads
    # (188-215 ms: each program reloads 128 KB of query tiles from L2).
    # Compact and select (bench/sweep_dsa.py --only topk at 128K, each against the kernels before in
    # the same run): the compact reads 16-byte vectors from the row start rounded down to 4 and both
    # write their scattered appends / outputs through a pure inline-asm st.global (asm_stores=1):
    # top-k 76.3-76.8 ms with 1,024-key compact tiles, 75.8 with 2,048, against 80.5-80.9 for the
    # compact before (scalar loads from the row start, tl.store); the vector loads with tl.store:
    # 92.6 (the compiler moved the scores and masks through shared memory into the scattered
    # stores' layout; 111.9 with the select's too). The select loads whole candidate rows (CAP
    # specialised) and ranks ties only when there are more than places: with 4 warps 74.0 ms against
    # 78.6 with 8 (16: 79.0). Compact with 8 warps 78.7-79.6, 512-key tiles 82.8.
    # The compact loads its next 1,024-key tile before compacting the current one (prefetch=1,
    # --only topk_tail, two runs against the compact before, 2,048-key tiles without prefetch, in
    # the same run): top-k 67.2-67.8 vs 69.8-70.6 ms at 128K, 6.53-6.56 vs 6.73-6.89 at 32K (80
    # registers, six programs per SM; 2,048-key tiles with prefetch 68.0-68.7 / 6.76 (148 registers),
    # 512: 71.7 / 6.64; two tiles ahead 66.9 / 6.49, not worth the second buffer).
    # The select's output pass SUB = 1,024 candidates at a time (--only topk_tail, one run, against
    # the whole-row select in the same run): top-k 70.4 ms at 128K (2,048: 71.1; whole rows 74.4-74.5),
    # 6.9 at 32K (whole rows 7.9-8.0). Rejected in that run: compact tiles of 4,096 keys (82.8 /
    # 9.1 ms); score lines only as long as each chunk's longest row, so that chunks of early rows
    # hold more rows in the same bytes (-0.9 ms at 128K, +0.2 at 32K; with SUB = 2,048 69.8 / 7.2).
    return dict(_GPU_CONFIG)


_GPU_CONFIG = dict(BT=16, BS=64, SB=128, R=1, warps_filter=2, warps_select=4, warps_sample=4,
                   stages_filter=2, mode="stored", RS=64, BN=128, KS=2048, BC=1024,
                   warps_score=8, stages_score=3, store=2, warps_compact=4, asm_stores=1,
                   select_sub=1024, prefetch=1)


# transient bytes per chunk of query blocks: the stored path's score slab plus candidate lists
# (the fused path's candidate lists); parallel/memory.py counts the same
TOPK_CHUNK_BYTES = 1 << 30


def topk_transient_bytes(B: int, T: int, topk: int, *, rows: int | None = None,
                         chunk_bytes: int = TOPK_CHUNK_BYTES, cfg: dict | None = None) -> int:
    """Bytes dsa_topk_triton allocates beside its [B, T, topk] output while it runs, at the default cap and
    samples: the rows' document starts, the query blocks' list, the fallback flags and one chunk's buffers (stored
    path: the fp32 score slab, rows + 1 lines of T keys rounded up to 16, and the candidate lists; fused path: the
    candidate lists, tau and the sample scratch), a chunk being as many query blocks as chunk_bytes holds, at most
    all of them. `rows`: the query rows selected when not all B * T are (a context-parallel rank's). `cfg`: the tile
    settings (_config), the GPU's by default. The exact fallback's rows, when any, are not counted (its buffers are
    chunked the same)."""
    cfg = _GPU_CONFIG if cfg is None else cfg
    cap, BT = default_cap(topk), cfg["BT"]
    nb = B * triton.cdiv(T, BT) if rows is None else triton.cdiv(rows, BT)
    if cfg["mode"] == "stored":
        n = max(1, min(nb, chunk_bytes // (BT * (T * 4 + cap * 8)))) * BT
        chunk = (n + 1) * (-(-T // 16) * 16) * 4
    else:
        n = max(1, min(nb, chunk_bytes // (BT * cap * 8))) * BT
        chunk = n * 4 + n * pow2(min(2048, cap // 2)) * 4   # tau, scratch
    # starts, blocks, fail flags; the chunk; candidate scores, positions and counts
    return 2 * B * T * 4 + nb * 4 + chunk + n * cap * 8 + n * 4


def default_cap(topk: int) -> int:
    return pow2(4 * topk, minimum=32)


def dsa_topk_triton(q_idx_BTHD: torch.Tensor, w_BTH: torch.Tensor, k_idx_BTD: torch.Tensor,
                    topk: int, cu_seqlens: torch.Tensor | None = None, *, cap: int | None = None,
                    num_samples: int | None = None, chunk_bytes: int = TOPK_CHUNK_BYTES,
                    stats: dict | None = None) -> torch.Tensor:
    """Exact top-`topk` key positions per query, [B, T, topk] int32 (see module docstring).

    cap: candidate slots per row (default next_pow2(4 * topk)); num_samples: threshold samples per
    row (default min(2048, cap // 2)); chunk_bytes bounds the transient buffers of one chunk of
    query blocks (stored mode: 4 bytes per key of each row's score slab plus 8 per candidate slot;
    fused mode: the candidate slots).
    `stats`, if given, receives the number of rows that needed the exact fallback.
    cu_seqlens must already be checked (`dsa_topk` runs validate_cu_seqlens once for its callers).
    """
    B, T, HI, DI = q_idx_BTHD.shape
    K = int(topk)
    if K < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    dev = q_idx_BTHD.device
    q_idx_BTHD, w_BTH, k_idx_BTD = (x.contiguous() for x in (q_idx_BTHD, w_BTH, k_idx_BTD))
    cap = default_cap(K) if cap is None else int(cap)
    if cap < K + 1:
        raise ValueError(f"cap ({cap}) must exceed topk ({K})")
    M = min(2048, cap // 2) if num_samples is None else int(num_samples)
    if not 1 <= M <= cap:
        raise ValueError(f"num_samples ({M}) must be in [1, cap={cap}]")
    start = row_doc_start(B, T, cu_seqlens, dev)
    NB = B * triton.cdiv(T, _config(dev)["BT"])
    out = torch.empty(B, T, K, dtype=torch.int32, device=dev)
    topk_blocks(q_idx_BTHD, w_BTH, k_idx_BTD, start, torch.arange(NB, dtype=torch.int32, device=dev),
                T, K, cap, M, out, chunk_bytes, stats)
    return out


def topk_blocks(q_idx, w, k_idx, start, blocks, T, K, cap, M, out, chunk_bytes, stats=None):
    """Exact top-K of the query blocks `blocks` (int32 block ids b * NBT + t // BT at the module's
    BT) into their `out` rows: `select_blocks`, then the exact fallback for the rows it flagged
    (one host sync to find them). `stats`, if given, receives the number of fallback rows."""
    cfg = _config(out.device)
    fail = torch.zeros(q_idx.shape[0] * T, dtype=torch.int32, device=out.device)
    select_blocks(q_idx, w, k_idx, start, blocks, T, K, cap, M, out, fail, chunk_bytes)
    failed_rows = fail.nonzero().flatten()
    if stats is not None:
        stats["fallback_rows"] = int(failed_rows.numel())
    if failed_rows.numel() > 0:
        _exact_fallback(q_idx, w, k_idx, start, failed_rows, out, T, triton.cdiv(T, cfg["BT"]), K,
                        chunk_bytes, cfg, dot_precision(q_idx.dtype))


def select_blocks(q_idx, w, k_idx, start, blocks, T, K, cap, M, out, fail, chunk_bytes):
    """Exact top-K of the query blocks `blocks` (int32 block ids b * NBT + t // BT at the module's
    BT) by the module's path (`mode`: stored or fused, see the module docstring), in chunks whose
    transient buffers stay within chunk_bytes; writes `out` rows and flags rows for the exact
    fallback in `fail` (both flattened b * T + t)."""
    cfg = _config(out.device)
    select = _select_stored if cfg["mode"] == "stored" else _select_fused
    select(q_idx, w, k_idx, start, blocks, T, K, cap, M, out, fail, chunk_bytes, cfg)


def _candidates(rows, cap, dev):
    """A chunk's candidate lists: scores, positions [rows, cap] and counts [rows]."""
    return (torch.empty(rows, cap, dtype=torch.float32, device=dev),
            torch.empty(rows, cap, dtype=torch.int32, device=dev),
            torch.empty(rows, dtype=torch.int32, device=dev))


def _select_candidates(start, blks, cnt, cand_s, cand_p, out, fail, T, NBT, K, cap, cfg):
    """topk_fwd_kernel_select over the chunk `blks`, both paths' last step."""
    BT, R = cfg["BT"], cfg["R"]
    nslot = blks.numel() * BT
    topk_fwd_kernel_select[(triton.cdiv(nslot, R),)](
        start, blks, cnt, cand_s, cand_p, out, fail, nslot, T, NBT, K, cap,
        BT=BT, R=R, RB=pow2(cap), OB=min(pow2(K), 1024), STORE=cfg["asm_stores"],
        SUB=min(cfg["select_sub"], pow2(cap)), num_warps=cfg["warps_select"])


def _select_fused(q_idx, w, k_idx, start, blocks, T, K, cap, M, out, fail, chunk_bytes, cfg):
    """select_blocks without stored scores: per chunk of at most chunk_bytes of candidates, the
    sample / tau / filter / select kernels."""
    dev = out.device
    HI, DI = q_idx.shape[2], q_idx.shape[3]
    BT, BS, SB, R = cfg["BT"], cfg["BS"], cfg["SB"], cfg["R"]
    DIP, MP = pow2(DI, 16), pow2(M)
    prec = dot_precision(q_idx.dtype)
    NBT = triton.cdiv(T, BT)
    nbc = max(1, min(blocks.numel(), chunk_bytes // (BT * cap * 8)))
    cand_s, cand_p, cnt = _candidates(nbc * BT, cap, dev)
    tau = torch.empty(nbc * BT, dtype=torch.float32, device=dev)
    scratch = torch.empty(nbc * BT, MP, dtype=torch.float32, device=dev)
    for c0 in range(0, blocks.numel(), nbc):
        blks = blocks[c0:c0 + nbc].contiguous()
        nslot = blks.numel() * BT
        topk_fwd_kernel_sample[(blks.numel(),)](
            q_idx, w, k_idx, start, blks, scratch, T, NBT, cap, M,
            HI=HI, DI=DI, DIP=DIP, BT=BT, SB=SB, MP=MP, DOT_PREC=prec,
            num_warps=cfg["warps_sample"])
        topk_fwd_kernel_tau[(triton.cdiv(nslot, R),)](
            start, blks, tau, scratch, nslot, T, NBT, K, cap, M, (K + cap) // 2, BT=BT, MP=MP,
            R=R, num_warps=cfg["warps_select"])
        topk_fwd_kernel_filter[(blks.numel(),)](
            q_idx, w, k_idx, start, blks, tau, cnt, cand_s, cand_p, T, NBT, cap,
            HI=HI, DI=DI, DIP=DIP, BT=BT, BS=BS, DOT_PREC=prec, num_warps=cfg["warps_filter"],
            num_stages=cfg["stages_filter"])
        _select_candidates(start, blks, cnt, cand_s, cand_p, out, fail, T, NBT, K, cap, cfg)


def _select_stored(q_idx, w, k_idx, start, blocks, T, K, cap, M, out, fail, chunk_bytes, cfg):
    """select_blocks with stored scores: per chunk of blocks, the score kernel writes the fp32
    scores of the chunk's rows ([rows, T], the chunk sized so that scores and candidate lists
    together stay within chunk_bytes), the compact kernel thresholds and appends, the select
    kernel takes the exact top-K of the candidates."""
    dev = out.device
    B, HI, DI = q_idx.shape[0], q_idx.shape[2], q_idx.shape[3]
    BT, RS, KS = cfg["BT"], cfg["RS"], cfg["KS"]
    NBT = triton.cdiv(T, BT)
    nbc = max(1, min(blocks.numel(), chunk_bytes // (BT * (T * 4 + cap * 8))))
    rows = nbc * BT
    W = -(-T // 16) * 16  # row stride: even for the paired store; 16 for the compact's vector loads
    if (rows + 1) * W >= 2 ** 31:
        raise ValueError(f"top-k score chunk of {rows} rows x {T} keys overflows int32 offsets; "
                         f"lower chunk_bytes ({chunk_bytes})")
    buf = torch.empty(rows + 1, W, dtype=torch.float32, device=dev)  # + the spare line
    store, stages, BN = cfg["store"], cfg["stages_score"], cfg["BN"]
    if q_idx.element_size() > 2:  # fp32 query tiles (twice the bytes) do not fit hoisted in
        store, stages, BN = 0, 1, 64  # shared memory: reload them per tile, unpipelined
    assert store == 0 or (BN % 2 == 0 and KS % BN == 0), (BN, KS)
    cand_s, cand_p, cnt = _candidates(rows, cap, dev)
    for c0 in range(0, blocks.numel(), nbc):
        blks = blocks[c0:c0 + nbc].contiguous()
        nslot = blks.numel() * BT
        topk_fwd_kernel_score[(triton.cdiv(nslot, RS), triton.cdiv(T, KS), B)](
            q_idx, w, k_idx, start, blks, buf, nslot, T, NBT, K, rows, W,
            HI=HI, DI=DI, DIP=pow2(DI, 16), BT=BT, RS=RS, BN=BN, KS=KS, STORE=store,
            DOT_PREC=dot_precision(q_idx.dtype), num_warps=cfg["warps_score"],
            num_stages=stages)
        topk_fwd_kernel_compact[(nslot,)](
            start, blks, buf, cnt, cand_s, cand_p, nslot, T, NBT, K, cap, M, (K + cap) // 2, W,
            BT=BT, MP=pow2(M), BC=cfg["BC"], STORE=cfg["asm_stores"], PF=cfg["prefetch"],
            num_warps=cfg["warps_compact"])
        _select_candidates(start, blks, cnt, cand_s, cand_p, out, fail, T, NBT, K, cap, cfg)


def _exact_fallback(q_idx, w, k_idx, start, failed_rows, out, T, NBT, K, chunk_bytes, cfg, prec):
    """Redo rows whose candidate count left [K, CAP]: keep every eligible key, then select."""
    dev = out.device
    B, HI, DI = q_idx.shape[0], q_idx.shape[2], q_idx.shape[3]
    BT, BS = cfg["BT"], cfg["BS"]
    b = failed_rows // T
    t = failed_rows % T
    blocks = torch.unique(b * NBT + t // BT).to(torch.int32)
    is_failed = torch.zeros(B * T, dtype=torch.bool, device=dev)
    is_failed[failed_rows] = True
    cap_fb = int((t - start[failed_rows].long() + 1).max().item())
    nbc = max(1, chunk_bytes // (BT * cap_fb * 8))
    for c0 in range(0, blocks.numel(), nbc):
        blks = blocks[c0:c0 + nbc]
        nb = blks.numel()
        slot_t = (blks.long() % NBT).view(-1, 1) * BT + torch.arange(BT, device=dev).view(1, -1)
        slot_row = (blks.long() // NBT).view(-1, 1) * T + slot_t.clamp_max(T - 1)
        hit = is_failed[slot_row] & (slot_t < T)
        tau = torch.where(hit, float("-inf"), float("inf")).to(torch.float32).flatten().contiguous()
        cnt = torch.empty(nb * BT, dtype=torch.int32, device=dev)
        cand_s = torch.empty(nb * BT, cap_fb, dtype=torch.float32, device=dev)
        cand_p = torch.empty(nb * BT, cap_fb, dtype=torch.int32, device=dev)
        topk_fwd_kernel_filter[(nb,)](
            q_idx, w, k_idx, start, blks, tau, cnt, cand_s, cand_p, T, NBT, cap_fb,
            HI=HI, DI=DI, DIP=pow2(DI, 16), BT=BT, BS=BS, DOT_PREC=prec,
            num_warps=cfg["warps_filter"])
        topk_fwd_kernel_select_long[(nb * BT,)](
            start, blks, cnt, cand_s, cand_p, out, T, NBT, K, cap_fb,
            BT=BT, RB=1024, num_warps=cfg["warps_select"])
