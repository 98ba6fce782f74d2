"""Union plan: the selected keys of each block of `block_q` adjacent query tokens, merged.

Adjacent queries pick largely the same keys (Keye-VL reports ~8K distinct keys for the 16 x 2048
selections of 16 adjacent queries), so the sparse-attention and sparse-loss kernels work per query
block: each distinct key is gathered once per block and KV group, and a per-key bit mask says which
of the block's tokens selected it. The plan is a CSR list per block:

    offsets_N1  int64 [NB + 1]   NB = B * ceil(T / block_q) blocks, batch-major
    pos_U       int32 [U]        key positions (within the batch row), ascending per block
    bits_U      int32 [U]        bit i set <=> token (block_start + i) selected that key

Two builders, equal output (tested): `build_sparse_plan` (Triton, used on the GPU and in tests)
sorts the block_q * K keys (position * block_q + token) of each block in registers, marks the last
entry of each run of equal positions and ORs the run's token bits, then compacts: a first launch
counts the distinct keys per block, a second (same compiled kernel) writes them at the prefix-sum
offsets. `build_sparse_plan_torch` (reference) scatter-adds bits into a dense [chunk, T] table.
Both are deterministic. Memory of the result: 8 bytes per distinct (block, key) pair, at most
8 * B * T * K bytes (no overlap at all).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import interpreting, pow2


@dataclass(frozen=True)
class SparsePlan:
    block_q: int
    B: int
    T: int
    num_blocks_t: int          # blocks per batch row, ceil(T / block_q)
    offsets_N1: torch.Tensor   # int64 [B * num_blocks_t + 1]
    pos_U: torch.Tensor        # int32 [U]
    bits_U: torch.Tensor       # int32 [U]

    @property
    def num_blocks(self) -> int:
        return self.B * self.num_blocks_t

    def mean_union(self) -> float:
        """Average number of distinct keys per block (a measure of selection overlap)."""
        return self.pos_U.numel() / max(1, self.num_blocks)


MAX_SORT = 16384  # block_q * next_pow2(K) entries sorted in registers by the Triton builder


@triton.jit(do_not_specialize=["T", "NBT", "K", "WRITE"])
def plan_fwd_kernel_union(idx_ptr, counts_ptr, offsets_ptr, pos_ptr, bits_ptr, T, NBT, K, WRITE,
                          BQ: tl.constexpr, KP: tl.constexpr):
    """One program per block: WRITE == 0 counts its distinct keys, WRITE == 1 writes them."""
    pid = tl.program_id(0)
    bb = pid // NBT
    i = tl.arange(0, BQ)
    j = tl.arange(0, KP)
    t = (pid % NBT) * BQ + i
    rows = (bb * T + tl.minimum(t, T - 1)).to(tl.int64)
    x = tl.load(idx_ptr + rows[:, None] * K + j[None, :],
                mask=(t < T)[:, None] & (j < K)[None, :], other=-1)
    key = tl.where(x >= 0, x * BQ + i[:, None], 2147483647)
    N: tl.constexpr = BQ * KP
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
        dest = tl.load(offsets_ptr + pid) + tl.cumsum(last.to(tl.int64), axis=0) - 1
        tl.store(pos_ptr + dest, s, mask=last)
        tl.store(bits_ptr + dest, run, mask=last)


def _check_block_q(block_q: int) -> None:
    if not 1 <= block_q <= 16 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two in [1, 16], got {block_q}")


def build_sparse_plan(idx_BTK: torch.Tensor, block_q: int, method: str = "auto") -> SparsePlan:
    """Merge the selections of each block of `block_q` adjacent tokens (see module docstring).

    idx rows must hold distinct positions (or -1), as `dsa_topk` produces. method: "triton",
    "torch", or "auto" (Triton on CUDA when block_q * next_pow2(K) <= MAX_SORT, else torch; the
    interpreter runs tl.sort far too slowly for anything but tiny shapes).
    """
    _check_block_q(block_q)
    B, T, K = idx_BTK.shape
    KP = pow2(K)
    if method not in ("auto", "triton", "torch"):
        raise ValueError(f"method must be 'auto', 'triton' or 'torch', got {method!r}")
    if method == "auto":
        fast = idx_BTK.device.type == "cuda" and not interpreting()
        method = "triton" if fast and block_q * KP <= MAX_SORT else "torch"
    if method == "torch":
        return build_sparse_plan_torch(idx_BTK, block_q)
    dev = idx_BTK.device
    idx = idx_BTK.to(torch.int32).contiguous()
    nbt = triton.cdiv(T, block_q)
    nb = B * nbt
    warps = 4 if interpreting() or block_q * KP <= 2048 else 8
    counts = torch.empty(nb, dtype=torch.int32, device=dev)
    offsets = torch.zeros(nb + 1, dtype=torch.int64, device=dev)
    plan_fwd_kernel_union[(nb,)](idx, counts, offsets, counts, counts, T, nbt, K, 0,
                                 BQ=block_q, KP=KP, num_warps=warps)
    offsets[1:] = torch.cumsum(counts, 0)
    total = int(offsets[-1].item())
    pos = torch.empty(total, dtype=torch.int32, device=dev)
    bits = torch.empty(total, dtype=torch.int32, device=dev)
    plan_fwd_kernel_union[(nb,)](idx, counts, offsets, pos, bits, T, nbt, K, 1,
                                 BQ=block_q, KP=KP, num_warps=warps)
    return SparsePlan(block_q, B, T, nbt, offsets, pos, bits)


def build_sparse_plan_torch(idx_BTK: torch.Tensor, block_q: int,
                            chunk_elems: int = 1 << 26) -> SparsePlan:
    """Reference builder (dense bit table per chunk of blocks); same result as build_sparse_plan."""
    _check_block_q(block_q)
    B, T, K = idx_BTK.shape
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
    per_chunk = max(1, chunk_elems // max(1, T))
    counts, pos_parts, bits_parts = [], [], []
    for c0 in range(0, n_blocks, per_chunk):
        sub = idx_NQK[c0:c0 + per_chunk]
        n = sub.shape[0]
        valid = sub >= 0
        table = torch.zeros(n * T, dtype=torch.int32, device=dev)
        rows = torch.arange(n, device=dev).view(n, 1, 1) * T
        flat = (rows + sub.clamp_min(0))[valid]
        table.index_add_(0, flat, bit_Q.expand(n, block_q, K)[valid])  # distinct bits: sum == or
        nz = table.nonzero().flatten()
        pos_parts.append((nz % T).to(torch.int32))
        bits_parts.append(table[nz])
        counts.append(torch.bincount(nz // T, minlength=n))
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
