"""Grouped GEMMs over rows sorted by expert, with three interchangeable backends.

Legend: T rows (tokens routed to the local experts, sorted by expert), E local experts, row group e is
rows [ends[e-1], ends[e]) (ends = cumulative token counts, int32, on the compute device).

    mm_nt(x [T,K], w [E,N,K])  -> [T,N]     y_e = x_e @ w[e]^T   (fc1 / fc2 forward)
    mm_nn(x [T,N], w [E,N,K])  -> [T,K]     y_e = x_e @ w[e]     (input gradients)
    mm_tn(a [T,M], b [T,N])    -> [E,M,N]   y[e] = a_e^T @ b_e   (weight gradients; 0 for empty groups)

Backends:
- "torch": `torch._grouped_mm` (CUTLASS on sm90/sm100 for bf16 without a host sync; other dtypes and
  devices use torch's own per-group fallback, which copies the offsets to the host). The layouts are
  chosen so that the weight gradient is the 2D x 2D case with a column-major A and a row-major B, the
  one case where torch's kernel accepts empty groups and puts no alignment condition on group sizes.
  Its remaining conditions: bf16 inputs, 16-byte-aligned base pointers, and leading strides that are
  multiples of 16 bytes (hidden and FFN sizes multiples of 8 in bf16).
- "triton": the kernels below (`grouped_mm_fwd_kernel_rows`, `grouped_mm_bwd_kernel_wgrad`); the
  row-tile -> expert map is built on the device, so no host sync either.
- "loop": one torch.mm per expert (needs the counts on the host: free when the dispatcher already put
  them there, a device sync otherwise). The reference, and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

BACKENDS = ("torch", "triton", "loop")


def has_torch_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


@dataclass
class GroupLayout:
    """Where each expert's rows are. `counts_host` is set only when known without a device sync."""

    ends: torch.Tensor  # int32 [E], cumulative row ends, on the compute device
    counts_host: torch.Tensor | None  # int64 [E] on the CPU, or None
    num_rows: int

    @property
    def num_groups(self) -> int:
        return self.ends.shape[0]

    def host_counts(self) -> list[int]:
        """Per-group row counts as Python ints (a device sync when they only live on the device)."""
        if self.counts_host is not None:
            return self.counts_host.tolist()
        ends = self.ends.tolist()
        return [b - a for a, b in zip([0] + ends[:-1], ends)]

    def starts(self) -> torch.Tensor:
        return self.ends - self.counts_device()

    def counts_device(self) -> torch.Tensor:
        e = self.ends
        return torch.diff(e, prepend=e.new_zeros(1))


def group_layout(tokens_per_expert, num_rows: int, device: torch.device) -> GroupLayout:
    """From megatron's `tokens_per_expert` (a CPU or device tensor, or a list) to a GroupLayout.

    The alltoall and allgather dispatchers of megatron-core 0.16.1 return the counts on the CPU (they
    already synchronised to size their collectives), so the cumulative ends are computed on the host and
    copied to the device asynchronously; counts that live on the device stay there.
    """
    if isinstance(tokens_per_expert, (list, tuple)):
        tokens_per_expert = torch.tensor(tokens_per_expert, dtype=torch.int64)
    if tokens_per_expert.device.type == "cpu":
        counts = tokens_per_expert.to(torch.int64)
        total = int(counts.sum())
        if total != num_rows:
            raise ValueError(f"tokens_per_expert sums to {total} but {num_rows} rows were given")
        ends = torch.cumsum(counts, 0).to(torch.int32)
        if device.type == "cuda":
            ends = ends.pin_memory().to(device, non_blocking=True)
        return GroupLayout(ends=ends, counts_host=counts, num_rows=num_rows)
    ends = torch.cumsum(tokens_per_expert, 0).to(device=device, dtype=torch.int32)
    return GroupLayout(ends=ends, counts_host=None, num_rows=num_rows)


# ----------------------------------------------------------------------------------------------- loop
def _loop_nt(x, w, layout):
    sizes = layout.host_counts()
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for e, n in enumerate(sizes):
        if n:
            torch.mm(x[start: start + n], w[e].t(), out=out[start: start + n])
        start += n
    return out


def _loop_nn(x, w, layout):
    sizes = layout.host_counts()
    out = x.new_empty(x.shape[0], w.shape[2])
    start = 0
    for e, n in enumerate(sizes):
        if n:
            torch.mm(x[start: start + n], w[e], out=out[start: start + n])
        start += n
    return out


def _loop_tn(a, b, layout):
    sizes = layout.host_counts()
    out = a.new_empty(len(sizes), a.shape[1], b.shape[1])
    start = 0
    for e, n in enumerate(sizes):
        torch.mm(a[start: start + n].t(), b[start: start + n], out=out[e])  # n == 0 gives zeros
        start += n
    return out


# ---------------------------------------------------------------------------------------------- torch
def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _torch_nt(x, w, layout):
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=layout.ends)


def _torch_nn(x, w, layout):
    return torch._grouped_mm(x, w, offs=layout.ends)


def _torch_tn(a, b, layout):
    """Weight gradients. Empty groups never reach the kernel when the counts are on the host: the call runs over
    the non-empty groups only and its result is scattered into a zero tensor (only when some group is empty).
    With counts on the device, empty groups are zeroed after the call."""
    if layout.counts_host is None:
        out = torch._grouped_mm(a.t(), b, offs=layout.ends)
        return out.masked_fill_((layout.counts_device() == 0)[:, None, None], 0)
    nonempty = torch.nonzero(layout.counts_host > 0).flatten()  # host tensors: no device sync
    if nonempty.numel() == layout.num_groups:
        return torch._grouped_mm(a.t(), b, offs=layout.ends)
    out = a.new_zeros(layout.num_groups, a.shape[1], b.shape[1])
    if nonempty.numel():
        ends = torch.cumsum(layout.counts_host[nonempty], 0).to(torch.int32)
        part = torch._grouped_mm(a.t(), b, offs=_to_device(ends, a.device))
        out.index_copy_(0, _to_device(nonempty, a.device), part)
    return out


# --------------------------------------------------------------------------------------------- triton
if HAS_TRITON:

    @triton.jit
    def grouped_mm_fwd_kernel_rows(a_ptr, b_ptr, c_ptr, tile_expert_ptr, tile_row_ptr, ends_ptr, N,
                                   stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                                   K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                   PRECISION: tl.constexpr):
        """c[rows of e] = a[rows of e] @ b[e] (b[e] is K x N through its strides). Program (n tile, row tile)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        e = tl.load(tile_expert_ptr + pid_m)
        if e < 0:
            return
        row0 = tl.load(tile_row_ptr + pid_m)
        row_end = tl.load(ends_ptr + e)
        rm = row0 + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_m = rm < row_end
        mask_n = rn < N
        rm64 = rm.to(tl.int64)
        a_ptrs = a_ptr + rm64[:, None] * stride_am + rk[None, :] * stride_ak
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + rk[:, None] * stride_bk + rn[None, :] * stride_bn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + rm64[:, None] * stride_cm + rn[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _wgrad_tile(acc, a_ptr, b_ptr, t0, end, rt, rm, rn, mask_m, mask_n,
                    stride_at, stride_am, stride_bt, stride_bn, PRECISION: tl.constexpr):
        rows = (t0 + rt).to(tl.int64)
        mask_t = (t0 + rt) < end
        a = tl.load(a_ptr + rows[:, None] * stride_at + rm[None, :] * stride_am,
                    mask=mask_t[:, None] & mask_m[None, :], other=0.0)
        b = tl.load(b_ptr + rows[:, None] * stride_bt + rn[None, :] * stride_bn,
                    mask=mask_t[:, None] & mask_n[None, :], other=0.0)
        return tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)

    @triton.jit
    def grouped_mm_bwd_kernel_wgrad(a_ptr, b_ptr, c_ptr, ends_ptr, M, N,
                                    stride_at, stride_am, stride_bt, stride_bn, stride_ce, stride_cm, stride_cn,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                                    PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
        """c[e] = a[rows of e]^T @ b[rows of e]; an empty group writes zeros. Program (m x n tile, expert)."""
        pid = tl.program_id(0)
        e = tl.program_id(1)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m = pid // num_n
        pid_n = pid % num_n
        end = tl.load(ends_ptr + e)
        start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rt = tl.arange(0, BLOCK_T)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if INTERPRET:  # the interpreter (numpy 2.4) cannot take tensor loop bounds: same tiles, while loop
            t0 = start
            while t0 < end:
                acc = _wgrad_tile(acc, a_ptr, b_ptr, t0, end, rt, rm, rn, mask_m, mask_n,
                                  stride_at, stride_am, stride_bt, stride_bn, PRECISION)
                t0 += BLOCK_T
        else:
            for t0 in range(start, end, BLOCK_T):
                acc = _wgrad_tile(acc, a_ptr, b_ptr, t0, end, rt, rm, rn, mask_m, mask_n,
                                  stride_at, stride_am, stride_bt, stride_bn, PRECISION)
        c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + rm[:, None] * stride_cm + rn[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tiles(dtype: torch.dtype) -> dict:
    """Tile sizes: small under the interpreter (its cost grows with the grid), Hopper-sized otherwise.
    Not autotuned (the interpreter cannot autotune); see bench/bench_moe.py for the measured speed."""
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _row_tiles(layout: GroupLayout, block_m: int):
    """Row tile -> (expert, first row), built on the device. At most cdiv(T, BM) + E tiles are needed."""
    counts = layout.counts_device()
    tiles = (counts + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(layout.num_rows, block_m) + layout.num_groups
    tid = torch.arange(max_tiles, device=counts.device, dtype=cum.dtype)
    expert = torch.searchsorted(cum, tid, right=True)
    valid = expert < layout.num_groups
    e = expert.clamp(max=layout.num_groups - 1)
    first_tile = (cum - tiles)[e]
    row = (layout.ends - counts)[e] + (tid - first_tile) * block_m
    return torch.where(valid, expert, -1).to(torch.int32).contiguous(), row.to(torch.int32).contiguous(), max_tiles


def _triton_rows(x, b_view, layout, n_out):
    """x [T,K] @ b_view[e] [K,N] for each group (b_view may be a transposed view)."""
    cfg = _tiles(x.dtype)
    t, k = x.shape
    out = torch.empty(t, n_out, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    tile_expert, tile_row, max_tiles = _row_tiles(layout, cfg["BLOCK_M"])
    grid = (triton.cdiv(n_out, cfg["BLOCK_N"]), max_tiles)
    grouped_mm_fwd_kernel_rows[grid](
        x, b_view, out, tile_expert, tile_row, layout.ends, n_out,
        x.stride(0), x.stride(1), b_view.stride(0), b_view.stride(1), b_view.stride(2), out.stride(0), out.stride(1),
        K=k, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PRECISION=_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def _triton_nt(x, w, layout):
    return _triton_rows(x, w.transpose(-2, -1), layout, w.shape[1])


def _triton_nn(x, w, layout):
    return _triton_rows(x, w, layout, w.shape[2])


def _triton_tn(a, b, layout):
    cfg = _tiles(a.dtype)
    m, n = a.shape[1], b.shape[1]
    out = torch.empty(layout.num_groups, m, n, dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), layout.num_groups)
    grouped_mm_bwd_kernel_wgrad[grid](
        a, b, out, layout.ends, m, n,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_T=cfg["BLOCK_K"], PRECISION=_precision(a.dtype),
        INTERPRET=_interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


# ------------------------------------------------------------------------------------------ dispatch
_OPS = {
    "loop": (_loop_nt, _loop_nn, _loop_tn),
    "torch": (_torch_nt, _torch_nn, _torch_tn),
    "triton": (_triton_nt, _triton_nn, _triton_tn),
}


def mm_nt(x, w, layout: GroupLayout, backend: str) -> torch.Tensor:
    return _OPS[backend][0](x, w, layout)


def mm_nn(x, w, layout: GroupLayout, backend: str) -> torch.Tensor:
    return _OPS[backend][1](x, w, layout)


def mm_tn(a, b, layout: GroupLayout, backend: str) -> torch.Tensor:
    return _OPS[backend][2](a, b, layout)
