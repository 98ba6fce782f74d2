"""SwiGLU with the router probability folded in, on the [T, 2F] output of the experts' fc1 GEMM.

    a = silu(g) * u * p        g = h[:, :F] (gate), u = h[:, F:] (up), p = routing probability [T]

computed in fp32 and rounded once to the activation dtype, in one pass over h. The backward pass
recomputes `a` (needed by the fc2 weight gradient) from h in the same pass that produces dh and dp,
so the forward never keeps `a` alive:

    dg = da * p * u * s * (1 + g * (1 - s))      s = sigmoid(g)
    du = da * p * silu(g)
    dp = sum_f da * silu(g) * u

Two implementations with one interface: `*_torch` (reference, used on the CPU and by the "loop"
backend) and `*_triton` (one kernel each for forward and backward, used on CUDA; tested under
TRITON_INTERPRET=1 in fp32). Megatron's SequentialMLP computes silu(g) * u in the activation dtype
and multiplies the probability afterwards (MLP.forward with per_token_scale); in fp32 the two agree to
rounding, in bf16 this version rounds once instead of three times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is part of the pinned stack
    HAS_TRITON = False


# ---------------------------------------------------------------------------------------------- torch
def swiglu_fwd_torch(h: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    g, u = h.float().chunk(2, dim=-1)
    a = F.silu(g) * u
    if probs is not None:
        a = a * probs.float().unsqueeze(-1)
    return a.to(h.dtype)


def swiglu_bwd_torch(h: torch.Tensor, probs: torch.Tensor | None, da: torch.Tensor):
    """Returns (a, dh, dprobs); dprobs is None without probs."""
    g, u = h.float().chunk(2, dim=-1)
    da = da.float()
    s = torch.sigmoid(g)
    silu = g * s
    act = silu * u
    if probs is not None:
        p = probs.float().unsqueeze(-1)
        a = act * p
        dprobs = (da * act).sum(-1).to(probs.dtype)
        dact = da * p
    else:
        a, dprobs, dact = act, None, da
    dg = dact * u * s * (1.0 + g * (1.0 - s))
    du = dact * silu
    return a.to(h.dtype), torch.cat([dg, du], dim=-1).to(h.dtype), dprobs


# --------------------------------------------------------------------------------------------- triton
if HAS_TRITON:

    @triton.jit
    def swiglu_fwd_kernel_probs(h_ptr, p_ptr, a_ptr, T, stride_h, stride_a, FF: tl.constexpr,
                                HAS_PROBS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
        pid = tl.program_id(0)
        rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = rt < T
        rt64 = rt.to(tl.int64)
        if HAS_PROBS:
            p = tl.load(p_ptr + rt64, mask=mask_t, other=0.0).to(tl.float32)
        for f0 in range(0, FF, BLOCK_F):
            rf = f0 + tl.arange(0, BLOCK_F)
            m = mask_t[:, None] & (rf < FF)[None, :]
            hp = h_ptr + rt64[:, None] * stride_h + rf[None, :]
            g = tl.load(hp, mask=m, other=0.0).to(tl.float32)
            u = tl.load(hp + FF, mask=m, other=0.0).to(tl.float32)
            a = g * tl.sigmoid(g) * u
            if HAS_PROBS:
                a = a * p[:, None]
            tl.store(a_ptr + rt64[:, None] * stride_a + rf[None, :], a.to(a_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def swiglu_bwd_kernel_probs(h_ptr, p_ptr, da_ptr, a_ptr, dh_ptr, dp_ptr, T,
                                stride_h, stride_da, stride_a, stride_dh, FF: tl.constexpr,
                                HAS_PROBS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr):
        pid = tl.program_id(0)
        rt = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = rt < T
        rt64 = rt.to(tl.int64)
        if HAS_PROBS:
            p = tl.load(p_ptr + rt64, mask=mask_t, other=0.0).to(tl.float32)
        dp_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for f0 in range(0, FF, BLOCK_F):
            rf = f0 + tl.arange(0, BLOCK_F)
            m = mask_t[:, None] & (rf < FF)[None, :]
            hp = h_ptr + rt64[:, None] * stride_h + rf[None, :]
            g = tl.load(hp, mask=m, other=0.0).to(tl.float32)
            u = tl.load(hp + FF, mask=m, other=0.0).to(tl.float32)
            da = tl.load(da_ptr + rt64[:, None] * stride_da + rf[None, :], mask=m, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            silu = g * s
            act = silu * u
            if HAS_PROBS:
                a = act * p[:, None]
                dp_acc += tl.sum(da * act, axis=1)
                dact = da * p[:, None]
            else:
                a = act
                dact = da
            dg = dact * u * s * (1.0 + g * (1.0 - s))
            du = dact * silu
            tl.store(a_ptr + rt64[:, None] * stride_a + rf[None, :], a.to(a_ptr.dtype.element_ty), mask=m)
            dhp = dh_ptr + rt64[:, None] * stride_dh + rf[None, :]
            tl.store(dhp, dg.to(dh_ptr.dtype.element_ty), mask=m)
            tl.store(dhp + FF, du.to(dh_ptr.dtype.element_ty), mask=m)
        if HAS_PROBS:
            tl.store(dp_ptr + rt64, dp_acc.to(dp_ptr.dtype.element_ty), mask=mask_t)


def _blocks(ff: int) -> tuple[int, int]:
    block_f = min(256, triton.next_power_of_2(max(ff, 16)))
    return 16, block_f


def swiglu_fwd_triton(h: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    assert h.dim() == 2 and h.shape[1] % 2 == 0
    if h.stride(1) != 1:
        h = h.contiguous()
    t, ff = h.shape[0], h.shape[1] // 2
    a = torch.empty(t, ff, dtype=h.dtype, device=h.device)
    if t == 0:
        return a
    bt, bf = _blocks(ff)
    p = probs.contiguous() if probs is not None else h  # dummy pointer when HAS_PROBS is False
    swiglu_fwd_kernel_probs[(triton.cdiv(t, bt),)](h, p, a, t, h.stride(0), a.stride(0), FF=ff,
                                                   HAS_PROBS=probs is not None, BLOCK_T=bt, BLOCK_F=bf)
    return a


def swiglu_bwd_triton(h: torch.Tensor, probs: torch.Tensor | None, da: torch.Tensor):
    assert h.dim() == 2 and h.shape[1] % 2 == 0
    if h.stride(1) != 1:
        h = h.contiguous()
    if da.stride(1) != 1:
        da = da.contiguous()
    t, ff = h.shape[0], h.shape[1] // 2
    a = torch.empty(t, ff, dtype=h.dtype, device=h.device)
    dh = torch.empty_like(h)
    dprobs = torch.empty(t, dtype=probs.dtype, device=h.device) if probs is not None else None
    if t == 0:
        return a, dh, dprobs
    bt, bf = _blocks(ff)
    p = probs.contiguous() if probs is not None else h
    swiglu_bwd_kernel_probs[(triton.cdiv(t, bt),)](
        h, p, da, a, dh, dprobs if dprobs is not None else h, t,
        h.stride(0), da.stride(0), a.stride(0), dh.stride(0), FF=ff,
        HAS_PROBS=probs is not None, BLOCK_T=bt, BLOCK_F=bf)
    return a, dh, dprobs


def swiglu_fwd(h, probs, *, use_triton: bool):
    return swiglu_fwd_triton(h, probs) if use_triton else swiglu_fwd_torch(h, probs)


def swiglu_bwd(h, probs, da, *, use_triton: bool):
    return swiglu_bwd_triton(h, probs, da) if use_triton else swiglu_bwd_torch(h, probs, da)
