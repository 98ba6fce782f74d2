"""Union plan: the selected keys of each block of `block_q` adjacent query tokens, merged.

Adjacent queries pick largely the same keys (Keye-VL reports ~8K distinct keys for the 16 x 2048
selections of 16 adjacent queries), so the sparse-attention and sparse-loss kernels work per query
block: each distinct key is gathered once per block and KV group, and a per-key bit mask says which
of the block's tokens selected it. The plan is a CSR list per block:

    offsets_N1  int64 [NB + 1]   NB = B * ceil(T / block_q) blocks, batch-major
    pos_U       int32 [U]        key positions (within the batch row), ascending per block
    bits_U      int32 [U]        bit i set <=> token (block_start + i) selected that key

Three builders, equal output (tested). `build_sparse_plan(method="bitmap")` (Triton, the default on
the GPU): per chunk of blocks, each token's selections set bits in its plane of the block's bitmap
(`plan_fwd_kernel_mark`, integer atomic OR: order-free; it also records the block's largest
position), then one walk over the words from the block's smallest to its largest selected position
(`plan_fwd_kernel_emit`) writes the positions with any bit set, ascending,
with their token bits, into a padded slot of `block_q * K` entries, and a copy kernel packs the
slots at the prefix-sum offsets (10.4-10.5 ms at 128K against 26.0-27.9 for the merge below,
bench/sweep_dsa.py --only plan). `method="triton"` sorts the block_q * K keys (position * block_q
+ token) of each block in registers (a bitonic merge of its sorted rows), marks the last entry of
each run of equal positions and ORs the run's token bits, and packs the same way (`one_pass=False`:
merge twice instead, counting first and writing second, with no slot buffer).
`build_sparse_plan_torch` (reference) scatter-adds bits into a dense [chunk, n_keys] table.
Query rows and key rows may differ in number (`n_keys`, default T): under context parallelism a
rank's rows select among all the sequence's keys (parallel/context/dsa.py).
All are deterministic. Memory of the result: 8 bytes per distinct (block, key) pair, at most
8 * B * T * K bytes (no overlap at all); while building, at most `chunk_bytes` (256 MiB) of slots
and bitmaps (n_keys / 2 bytes per 4-token block), plus a second copy of the plan while the packed chunks
are joined.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .common import interpreting, pow2, validate_cu_seqlens


@dataclass(frozen=True)
class SparsePlan:
    block_q: int
    B: int
    T: int
    num_blocks_t: int          # blocks per batch row, ceil(T / block_q)
    offsets_N1: torch.Tensor   # int64 [B * num_blocks_t + 1]
    pos_U: torch.Tensor        # int32 [U]
    bits_U: torch.Tensor       # int32 [U]
    # tokens in the longest document (None: the key rows' count): the widest key range a query
    # reaches, which the attention backward's launch configuration depends on (sparse_attn._config)
    max_doc_len: int | None = None

    @property
    def num_blocks(self) -> int:
        return self.B * self.num_blocks_t

    def mean_union(self) -> float:
        """Average number of distinct keys per block (a measure of selection overlap)."""
        return self.pos_U.numel() / max(1, self.num_blocks)


MAX_SORT = 16384  # block_q * next_pow2(K) entries sorted in registers by the Triton builder


@triton.jit
def _merge_rows(x, BQ: tl.constexpr, KP: tl.constexpr, LOG_KP: tl.constexpr,
                LOG_N: tl.constexpr):
    """[BQ, KP] int32 rows, each ascending -> [BQ * KP] ascending (bitonic merging).

    A full sort of BQ * KP keys takes log2(N) (log2(N) + 1) / 2 compare-exchange stages (91 for
    4 x 2048); the rows are already sorted, so only the merge rounds are needed (25 for 4 x 2048).
    The keys live on a [2] * log2(N) hypercube: bit b of a key's index is one size-2 dimension,
    and the compare-exchange partner across bit b is the tensor flipped along that dimension.
    Round r merges runs of 2**r into runs of 2**(r + 1); its inputs must alternate ascending /
    descending runs, so odd rows are reversed first and every round but the last writes its odd
    runs descending.
    """
    N: tl.constexpr = BQ * KP
    x2 = tl.where((tl.arange(0, BQ) % 2 == 1)[:, None], tl.flip(x, 1), x)
    shape: tl.constexpr = [2] * LOG_N
    h = tl.reshape(x2, shape)
    index = tl.reshape(tl.arange(0, N), shape)
    for r in tl.static_range(LOG_KP, LOG_N):
        if r + 1 < LOG_N:
            desc = ((index >> (r + 1)) & 1) != 0
        else:
            desc = index < 0  # the last round: everything ascending
        for b in tl.static_range(r, -1, -1):      # bits r, r-1, ..., 0
            partner = tl.flip(h, LOG_N - 1 - b)   # dimension of bit b (innermost = bit 0)
            right = ((index >> b) & 1) != 0
            h = tl.where(right != desc, tl.maximum(h, partner), tl.minimum(h, partner))
    return tl.reshape(h, [N])


@triton.jit(do_not_specialize=["T", "NBT", "K", "WRITE", "PID0", "CAPB"])
def plan_fwd_kernel_union(idx_ptr, counts_ptr, offsets_ptr, pos_ptr, bits_ptr, T, NBT, K, WRITE,
                          PID0, CAPB, BQ: tl.constexpr, KP: tl.constexpr, MERGE: tl.constexpr,
                          LOG_KP: tl.constexpr, LOG_N: tl.constexpr):
    """Program p handles block PID0 + p. WRITE == 0 counts its distinct keys, WRITE == 1 writes
    them at offsets_ptr[block], WRITE == 2 writes them at slot p * CAPB of a padded buffer and
    stores the count (one pass; `plan_fwd_kernel_compact` then packs the slots).
    MERGE: bitonic-merge the (ascending) rows instead of sorting all BQ * KP keys."""
    pid = PID0 + tl.program_id(0)
    bb = pid // NBT
    i = tl.arange(0, BQ)
    j = tl.arange(0, KP)
    t = (pid % NBT) * BQ + i
    rows = (bb * T + tl.minimum(t, T - 1)).to(tl.int64)
    x = tl.load(idx_ptr + rows[:, None] * K + j[None, :],
                mask=(t < T)[:, None] & (j < K)[None, :], other=-1)
    # -1 padding sits at the end of each row, so the mapped rows stay ascending
    key = tl.where(x >= 0, x * BQ + i[:, None], 2147483647)
    N: tl.constexpr = BQ * KP
    if MERGE:
        key = _merge_rows(key, BQ, KP, LOG_KP, LOG_N)
    else:
        key = tl.sort(tl.reshape(key, [N]))
    a = tl.arange(0, N)
    valid = key != 2147483647
    s = key // BQ
    bit = tl.where(valid, tl.full([N], 1, tl.int32) << (key % BQ), 0)
    last = valid & ((a == N - 1) | (tl.gather(s, tl.minimum(a + 1, N - 1), 0) != s))
    run = bit  # a run of equal positions is at most BQ long and its bits are distinct
    for d in tl.static_range(1, BQ):
        back = tl.maximum(a - d, 0)
        same = (a >= d) & (tl.gather(s, back, 0) == s)
        run += tl.where(same, tl.gather(bit, back, 0), 0)
    if WRITE == 0:
        tl.store(counts_ptr + pid, tl.sum(last.to(tl.int32), axis=0))
    else:
        if WRITE == 1:
            base = tl.load(offsets_ptr + pid)
        else:
            tl.store(counts_ptr + pid, tl.sum(last.to(tl.int32), axis=0))
            base = tl.program_id(0).to(tl.int64) * CAPB
        dest = base + tl.cumsum(last.to(tl.int64), axis=0) - 1
        tl.store(pos_ptr + dest, s, mask=last)
        tl.store(bits_ptr + dest, run, mask=last)


@triton.jit(do_not_specialize=["CAPB", "BASE"])
def plan_fwd_kernel_compact(pad_pos, pad_bits, offsets_ptr, pos_ptr, bits_ptr, CAPB, BASE,
                            BLOCK: tl.constexpr):
    """Block p of a chunk: copy its count (offsets[p + 1] - offsets[p]) entries from padded slot
    p * CAPB to offsets[p] - BASE of the chunk's packed output."""
    p = tl.program_id(0)
    lo = tl.load(offsets_ptr + p)
    n = tl.load(offsets_ptr + p + 1) - lo
    src = p.to(tl.int64) * CAPB
    dst = lo - BASE
    for e0 in range(0, n, BLOCK):
        e = e0 + tl.arange(0, BLOCK)
        m = e < n
        tl.store(pos_ptr + dst + e, tl.load(pad_pos + src + e, mask=m), mask=m)
        tl.store(bits_ptr + dst + e, tl.load(pad_bits + src + e, mask=m), mask=m)


@triton.jit(do_not_specialize=["T", "NBT", "K", "PID0", "WORDS", "NKEYS", "NB"])
def plan_fwd_kernel_mark(idx_ptr, bm_ptr, hi_ptr, T, NBT, K, PID0, WORDS, NKEYS, NB,
                         BQ: tl.constexpr, KB: tl.constexpr):
    """Bitmap builder, step 1. Program (p, i): token i of block PID0 + p sets bit pos % 32 of
    word pos // 32 of its plane in the block's bitmap, laid out [word, token] (bm_ptr + (p *
    WORDS + word) * BQ + i, the chunk's block p), and raises hi_ptr[p] to its largest position
    (where the emit walk ends). Integer OR and max: the results do not depend on the order of the
    atomics. Positions at or beyond NKEYS (no such key row) are not marked; hi_ptr[NB] gets the
    largest of them (it stays -1 when there are none), for the host to reject them (_pack_slots)."""
    p = tl.program_id(0)
    i = tl.program_id(1)
    pid = PID0 + p
    bb = pid // NBT
    t = (pid % NBT) * BQ + i
    row = (bb * T + tl.minimum(t, T - 1)).to(tl.int64)
    base = bm_ptr + p.to(tl.int64) * WORDS * BQ + i
    for j0 in range(0, K, KB):
        j = j0 + tl.arange(0, KB)
        raw = tl.load(idx_ptr + row * K + j, mask=(j < K) & (t < T), other=-1)
        x = tl.where(raw < NKEYS, raw, -1)
        tl.atomic_or(base + (x // 32).to(tl.int64) * BQ, tl.full([KB], 1, tl.int32) << (x % 32),
                     mask=x >= 0, sem="relaxed")
        tl.atomic_max(hi_ptr + p, tl.max(x, axis=0), sem="relaxed")
        top = tl.max(raw, axis=0)
        if top >= NKEYS:  # only a bad tile touches the chunk's one shared word
            tl.atomic_max(hi_ptr + NB, top, sem="relaxed")


@triton.jit(do_not_specialize=["T", "NBT", "K", "PID0", "WORDS", "CAPB"])
def plan_fwd_kernel_emit(bm_ptr, idx_ptr, hi_ptr, counts_ptr, pos_ptr, bits_ptr, T, NBT, K, PID0,
                         WORDS, CAPB, BQ: tl.constexpr, NW: tl.constexpr):
    """Bitmap builder, step 2 (program p: block PID0 + p): walk the block's bitmap words from its
    smallest selected position (the minimum of its rows' first entries: rows are ascending) to its
    largest (hi_ptr[p], from the mark step; not the block's last row index: under context
    parallelism a rank's rows select keys beyond their row count), and write every position whose
    token bits are not all zero, ascending, with those bits, into padded slot p * CAPB (count to
    counts_ptr[block]); plan_fwd_kernel_compact then packs the slots."""
    p = tl.program_id(0)
    pid = PID0 + p
    bb = pid // NBT
    t0 = (pid % NBT) * BQ
    hi = tl.maximum(tl.load(hi_ptr + p), 0)  # -1: nothing selected (the walk reads zero words)
    tq = t0 + tl.arange(0, BQ)
    first = tl.load(idx_ptr + (bb * T + tl.minimum(tq, T - 1)).to(tl.int64) * K,
                    mask=tq < T, other=-1)
    lo = tl.min(tl.where(first >= 0, first, WORDS * 32), axis=0)
    base = bm_ptr + p.to(tl.int64) * WORDS * BQ
    dst = p.to(tl.int64) * CAPB
    i = tl.arange(0, BQ)
    b = tl.arange(0, 32)
    cnt = tl.zeros([], dtype=tl.int32)
    for w0 in range(lo // 32, hi // 32 + 1, NW):
        w = w0 + tl.arange(0, NW)
        words = tl.load(base + w[:, None].to(tl.int64) * BQ + i[None, :],
                        mask=(w <= hi // 32)[:, None], other=0)
        tb = tl.zeros([NW, 32], dtype=tl.int32)
        for r in tl.static_range(BQ):
            wr = tl.sum(tl.where(i[None, :] == r, words, 0), axis=1)
            tb |= ((wr[:, None] >> b[None, :]) & 1) << r
        member = tb != 0
        m = member.to(tl.int32)
        per_word = tl.sum(m, axis=1)
        rank = (tl.cumsum(per_word, axis=0) - per_word)[:, None] + tl.cumsum(m, axis=1) - 1
        pos = w[:, None] * 32 + b[None, :]
        tl.store(pos_ptr + dst + cnt + rank, pos, mask=member)
        tl.store(bits_ptr + dst + cnt + rank, tb, mask=member)
        cnt += tl.sum(per_word, axis=0)
    tl.store(counts_ptr + pid, cnt)


def _beyond_keys(top: int, n_keys: int, T: int) -> ValueError:
    return ValueError(f"idx holds key position {top}, beyond the {n_keys} key rows ({T} query "
                      "rows; pass n_keys when queries select among more keys): positions must "
                      "lie in [0, n_keys), or be -1 for an unused slot")


def _check_positions(idx: torch.Tensor, n_keys: int, T: int) -> None:
    """Raise if idx holds a position >= n_keys (one host sync)."""
    if idx.numel() and (top := int(idx.max())) >= n_keys:
        raise _beyond_keys(top, n_keys, T)


def _check_block_q(block_q: int) -> None:
    if not 1 <= block_q <= 16 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two in [1, 16], got {block_q}")


# slots (and bitmaps) built at once per chunk of query blocks; parallel/memory.py counts it too
PLAN_CHUNK_BYTES = 256 << 20


def build_sparse_plan(idx_BTK: torch.Tensor, block_q: int, method: str = "auto",
                      merge: bool = True, num_warps: int | None = None,
                      one_pass: bool = True, chunk_bytes: int = PLAN_CHUNK_BYTES,
                      cu_seqlens: torch.Tensor | None = None,
                      max_doc_len: int | None = None,
                      n_keys: int | None = None) -> SparsePlan:
    """Merge the selections of each block of `block_q` adjacent tokens (see module docstring).

    cu_seqlens (packed documents, as given to dsa_topk) is checked and only sets the plan's
    `max_doc_len`; the documents are already encoded in idx. A caller that already checked them
    passes the length validate_cu_seqlens returned as max_doc_len instead, which saves a host
    sync. n_keys: the number of key rows, every position in idx below it (default: idx's T, keys
    and queries one sequence; under context parallelism a rank's query rows select among more
    keys than it holds rows). The other arguments are _build_plan's.
    """
    if n_keys is not None and cu_seqlens is not None:
        raise ValueError("cu_seqlens describe one sequence of queries and keys; with n_keys (query "
                         "rows a subset of the keys) pass the widest key range as max_doc_len")
    plan = _build_plan(idx_BTK, block_q, method, merge, num_warps, one_pass, chunk_bytes, n_keys)
    if max_doc_len is None:
        max_doc_len = (n_keys if n_keys is not None
                       else validate_cu_seqlens(cu_seqlens, idx_BTK.shape[0], idx_BTK.shape[1]))
    return replace(plan, max_doc_len=int(max_doc_len))


def _build_plan(idx_BTK: torch.Tensor, block_q: int, method: str, merge: bool,
                num_warps: int | None, one_pass: bool, chunk_bytes: int,
                n_keys: int | None = None) -> SparsePlan:
    """build_sparse_plan without max_doc_len.

    idx rows must hold distinct positions (or -1), as `dsa_topk` produces. method: "bitmap",
    "triton" (the merge), "torch", or "auto" (the bitmap builder on CUDA, torch otherwise: the
    interpreter runs per-element Triton ops far too slowly for anything but tiny shapes).
    merge=False sorts each block's keys from scratch instead of merging its sorted rows (the
    earlier kernel, kept for comparison in bench/sweep_dsa.py). one_pass (merge builder): merge
    each block once, writing its distinct keys into a padded slot of block_q * K entries per block
    (chunks of blocks, at most `chunk_bytes` of slots, and of bitmaps for the bitmap builder, at a
    time), then pack the slots; else merge twice, counting first and writing at the prefix-sum
    offsets second (no transient buffer). Same plan either way.
    """
    _check_block_q(block_q)
    B, T, K = idx_BTK.shape
    KP = pow2(K)
    if method not in ("auto", "triton", "torch", "bitmap"):
        raise ValueError(f"method must be 'auto', 'triton', 'bitmap' or 'torch', got {method!r}")
    if method == "auto":
        method = "bitmap" if idx_BTK.device.type == "cuda" and not interpreting() else "torch"
    if method == "torch":
        return build_sparse_plan_torch(idx_BTK, block_q, n_keys=n_keys)
    if method == "triton" and block_q * KP > MAX_SORT:
        raise ValueError(f"method='triton' merges block_q * next_pow2(K) = {block_q * KP} keys in "
                         f"registers (at most {MAX_SORT}); use method='bitmap'")
    dev = idx_BTK.device
    idx = idx_BTK.to(torch.int32).contiguous()
    nbt = triton.cdiv(T, block_q)
    nb = B * nbt
    n_keys = T if n_keys is None else n_keys
    if method == "bitmap":
        return _build_bitmap(idx, block_q, B, T, K, nbt, chunk_bytes, n_keys)
    _check_positions(idx, n_keys, T)  # the merge builder never looks
    # timed at 128K on an H200 (bench/sweep_dsa.py): one pass 26.6 ms with 8 warps, 27.8 with 4;
    # two passes (count, write) 38.9 ms with 4 warps, 44.4 with 8, 56.5 with 16; the full sort
    # the merge replaced took 106.6 ms
    if num_warps:
        warps = num_warps
    elif interpreting() or block_q * KP <= 2048:
        warps = 4
    else:
        warps = 8 if one_pass or not merge else 4
    meta = dict(BQ=block_q, KP=KP, MERGE=merge, LOG_KP=KP.bit_length() - 1,
                LOG_N=(block_q * KP).bit_length() - 1, num_warps=warps)
    counts = torch.empty(nb, dtype=torch.int32, device=dev)
    offsets = torch.zeros(nb + 1, dtype=torch.int64, device=dev)
    if not one_pass:
        plan_fwd_kernel_union[(nb,)](idx, counts, offsets, counts, counts, T, nbt, K, 0, 0, 0,
                                     **meta)
        offsets[1:] = torch.cumsum(counts, 0)
        total = int(offsets[-1].item())
        pos = torch.empty(total, dtype=torch.int32, device=dev)
        bits = torch.empty(total, dtype=torch.int32, device=dev)
        plan_fwd_kernel_union[(nb,)](idx, counts, offsets, pos, bits, T, nbt, K, 1, 0, 0, **meta)
        return SparsePlan(block_q, B, T, nbt, offsets, pos, bits)
    capb = block_q * K  # at most this many distinct keys per block
    per_chunk = max(1, min(nb, chunk_bytes // (8 * capb)))

    def union(c0, n, pad_pos, pad_bits):
        plan_fwd_kernel_union[(n,)](idx, counts, offsets, pad_pos, pad_bits, T, nbt, K, 2, c0,
                                    capb, **meta)
    return _pack_slots(union, block_q, B, T, nbt, capb, per_chunk, counts, offsets, dev)


def _pack_slots(fill, block_q, B, T, nbt, capb, per_chunk, counts, offsets, dev,
                n_keys=None) -> SparsePlan:
    """Per chunk of `per_chunk` blocks: fill(c0, n, pad_pos, pad_bits) writes each block's distinct
    keys into its padded slot of capb entries and their number into counts; the slots are packed
    at the prefix-sum offsets and the packed chunks joined. A fill that returns a 1-element
    tensor (the chunk's largest position) has it checked against n_keys in the host sync that
    reads the chunk's offsets."""
    nb = B * nbt
    pad_pos = torch.empty(per_chunk * capb, dtype=torch.int32, device=dev)
    pad_bits = torch.empty_like(pad_pos)
    pos_parts, bits_parts = [], []
    for c0 in range(0, nb, per_chunk):
        n = min(per_chunk, nb - c0)
        top = fill(c0, n, pad_pos, pad_bits)
        off = offsets[c0:c0 + n + 1]
        off[1:] = off[0] + torch.cumsum(counts[c0:c0 + n], 0)
        ends = off[[0, -1]] if top is None else torch.cat((off[[0, -1]], top.to(off.dtype)))
        base, end, *top = (int(v) for v in ends.tolist())
        if top and top[0] >= n_keys:
            raise _beyond_keys(top[0], n_keys, T)
        pos_c = torch.empty(end - base, dtype=torch.int32, device=dev)
        bits_c = torch.empty_like(pos_c)
        plan_fwd_kernel_compact[(n,)](pad_pos, pad_bits, off, pos_c, bits_c, capb, base,
                                      BLOCK=1024, num_warps=4)
        pos_parts.append(pos_c)
        bits_parts.append(bits_c)
    del pad_pos, pad_bits
    pos = pos_parts[0] if len(pos_parts) == 1 else torch.cat(pos_parts)
    bits = bits_parts[0] if len(bits_parts) == 1 else torch.cat(bits_parts)
    return SparsePlan(block_q, B, T, nbt, offsets, pos, bits)


def _config() -> dict:
    """Bitmap builder launch sizes: KB selections per mark tile, bits_emit bitmap bits (words x 32 x
    block_q) per emit tile."""
    # timed at 128K on an H200 (bench/sweep_dsa.py --only plan, two runs; the merge builder 26.0-27.9
    # ms in the same runs): 16384 bits / 2 warps (kept) 10.51, 16384 / 4: 10.37-10.41, 8192 / 2:
    # 10.36-10.85, 8192 / 4: 13.20-13.95, 4096 / 4: 14.11, 32768 / 2: 11.62, 8192 / 8: 16.11, 1 emit
    # warp 10.51-12.14; KB 2048 or 8 mark warps: no change; 1 GiB chunks instead of 256 MiB: 9.41-12.56
    # (kept at 256 MiB for memory)
    return dict(KB=1024, warps_mark=4, bits_emit=16384, warps_emit=2)


def _build_bitmap(idx, block_q, B, T, K, nbt, chunk_bytes, n_keys) -> SparsePlan:
    """The union plan from per-block bitmaps: each token's selections set bits in its plane of the
    block's [n_keys / 32 words, block_q] bitmap (integer atomic OR), then one walk over the words
    from the block's smallest to its largest selected position writes the positions with any bit
    set, ascending (no sort or merge; no limit on K). Chunks of blocks hold the bitmaps and padded
    slots within chunk_bytes."""
    dev = idx.device
    nb = B * nbt
    words = triton.cdiv(n_keys, 32)
    capb = block_q * K
    per_chunk = max(1, min(nb, chunk_bytes // (8 * capb + 4 * words * block_q + 4)))
    bm = torch.empty(per_chunk * words * block_q, dtype=torch.int32, device=dev)
    # largest selected position per block, then the chunk's largest position beyond the keys (-1: none)
    hi = torch.empty(per_chunk + 1, dtype=torch.int32, device=dev)
    counts = torch.empty(nb, dtype=torch.int32, device=dev)
    offsets = torch.zeros(nb + 1, dtype=torch.int64, device=dev)
    cfg = _config()

    def fill(c0, n, pad_pos, pad_bits):
        bm[:n * words * block_q].zero_()
        hi.fill_(-1)
        plan_fwd_kernel_mark[(n, block_q)](idx, bm, hi, T, nbt, K, c0, words, n_keys, per_chunk,
                                           BQ=block_q, KB=min(cfg["KB"], pow2(K)),
                                           num_warps=cfg["warps_mark"])
        plan_fwd_kernel_emit[(n,)](bm, idx, hi, counts, pad_pos, pad_bits, T, nbt, K, c0, words,
                                   capb, BQ=block_q, NW=max(1, cfg["bits_emit"] // (32 * block_q)),
                                   num_warps=cfg["warps_emit"])
        return hi[per_chunk:]
    return _pack_slots(fill, block_q, B, T, nbt, capb, per_chunk, counts, offsets, dev, n_keys)


def build_sparse_plan_torch(idx_BTK: torch.Tensor, block_q: int,
                            chunk_elems: int = 1 << 26, n_keys: int | None = None) -> SparsePlan:
    """Reference builder (dense [blocks, n_keys] bit table per chunk of blocks); same result as
    build_sparse_plan. n_keys (default T) bounds the positions in idx, which it checks."""
    _check_block_q(block_q)
    B, T, K = idx_BTK.shape
    NK = T if n_keys is None else n_keys
    _check_positions(idx_BTK, NK, T)
    dev = idx_BTK.device
    nbt = triton.cdiv(T, block_q)
    pad = nbt * block_q - T
    idx = idx_BTK.to(torch.int64)
    if pad:
        idx = torch.cat([idx, idx.new_full((B, pad, K), -1)], dim=1)
    idx_NQK = idx.view(B * nbt, block_q, K)
    bit_Q = (torch.ones(block_q, dtype=torch.int32, device=dev)
             << torch.arange(block_q, dtype=torch.int32, device=dev)).view(1, block_q, 1)
    n_blocks = B * nbt
    per_chunk = max(1, chunk_elems // max(1, NK))
    counts, pos_parts, bits_parts = [], [], []
    for c0 in range(0, n_blocks, per_chunk):
        sub = idx_NQK[c0:c0 + per_chunk]
        n = sub.shape[0]
        valid = sub >= 0
        table = torch.zeros(n * NK, dtype=torch.int32, device=dev)
        rows = torch.arange(n, device=dev).view(n, 1, 1) * NK
        flat = (rows + sub.clamp_min(0))[valid]
        table.index_add_(0, flat, bit_Q.expand(n, block_q, K)[valid])  # distinct bits: sum == or
        nz = table.nonzero().flatten()
        pos_parts.append((nz % NK).to(torch.int32))
        bits_parts.append(table[nz])
        counts.append(torch.bincount(nz // NK, minlength=n))
    counts_N = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long, device=dev)
    offsets = torch.zeros(n_blocks + 1, dtype=torch.int64, device=dev)
    offsets[1:] = torch.cumsum(counts_N, 0)
    pos = torch.cat(pos_parts) if pos_parts else torch.zeros(0, dtype=torch.int32, device=dev)
    bits = torch.cat(bits_parts) if bits_parts else torch.zeros(0, dtype=torch.int32, device=dev)
    return SparsePlan(block_q, B, T, nbt, offsets, pos.contiguous(), bits.contiguous())


def default_block_q(num_q_heads: int, num_kv_heads: int) -> int:
    """Tokens per program so that block_q * G is 32 query rows (G = Hq / Hkv), in [1, 16].

    32 rows is what the fused backward holds without register spills at D = 128 (8 warps,
    checked by compiling for sm_90 with aot_check.py)."""
    g = triton.next_power_of_2(num_q_heads // num_kv_heads)
    return max(1, min(16, 32 // g))
