"""The sparse stage's attention and indexer KL in one autograd node: the KL's target from the attention backward.

The split path (sparse_attn.py + indexer_loss.py) computes the KL's target P (the attention probabilities
summed over the query heads) in the loss forward, gathering every selected key row again and redoing
Hq q.k dots per entry (`indexer_loss_fwd_kernel_psum`), and keeps it (bf16, BQ values per union entry) until
the backward. The attention backward recomputes exactly these probabilities to get dq, dk, dv. Here it also
sums them over each KV group's heads and adds them into an fp32 buffer, and the KL's forward and backward
kernels read that buffer afterwards, chunk by chunk of blocks:

    per chunk of blocks (its fp32 P at most `chunk_bytes`):
        sparse_attn_bwd_kernel_union(PSUM)   dq, dk, dv  +  P of the chunk's entries (4 groups, fp32 atomics)
        indexer_loss_fwd_kernel_kl(PSUM_IN)  per-token KL, lse_I, Z
        indexer_loss_bwd_kernel_kl(LOAD_P)   dq_idx, dw (written), dk_idx (fp32 atomics)

What this changes for a user of `dsa_attention(..., kl_in_backward=weight)`:
* the loss's gradient is fixed when the call is made: the indexer receives `weight * d mean_t KL_t / d(.)`,
  whatever gradient reaches the output (as a loss attached to the output would; the model's DSA layer
  attaches its KL with the weight d total / d KL);
* the KL's value exists only once the backward has run: the call returns a 0-dim fp32 tensor, NaN until
  then, which the backward fills (the trainer reads it after the step's backward);
* nothing of the KL is kept between forward and backward (the split path keeps BQ * 2 bytes per union
  entry: ~8 KB per token at Keye's shapes, as much as the attention output), and the backward's transient
  is one chunk of fp32 P;
* P's sum over the KV groups is taken by fp32 atomics, so the KL and the indexer's gradients depend on
  their order in the last bits, as dk, dv and dk_idx already do; with torch's deterministic algorithms on,
  every one of these sums is taken in int64 fixed point with integer atomics instead, exact in any order
  (kernels/dsa/README.md, "Deterministic backward").
"""
from __future__ import annotations

import torch

from .common import from_fixed_point
from .indexer_loss import LOSS_CHUNK_BYTES, kl_bwd_blocks, kl_bwd_fixed_point_scale, kl_fwd_from_p, psum_chunks
from .plan import SparsePlan
from .sparse_attn import attn_bwd_fixed_point_scales, sparse_attn_bwd_blocks, sparse_attn_fwd


def attention_kl_bwd(q, k, v, o, do, lse, q_idx, w, k_idx, plan: SparsePlan, scale: float,
                     gscale: torch.Tensor, chunk_bytes: int | None = None):
    """(dq, dk, dv, dq_idx, dw, dk_idx, kl) for the attention's output gradient `do` and d loss / d KL_t =
    gscale (a 1-element fp32 tensor); kl [B*T] fp32 is each token's KL over its selected keys. The plan's
    block size must be the loss kernels' (`indexer_loss.loss_block_q`). Inputs contiguous. Per chunk of blocks
    whose head-summed P fits `chunk_bytes` (default LOSS_CHUNK_BYTES) as fp32.
    With torch's deterministic algorithms on (train.deterministic): dk, dv, P and dk_idx are summed in int64 fixed
    point with integer atomics (exact in any order), each with its scale (attn_bwd_fixed_point_scales,
    kl_bwd_fixed_point_scale); a chunk's P is converted to fp32 before the KL kernels read it. Its int64 sums and
    their fp32 copy share the same budget."""
    B, T = q.shape[:2]
    det = torch.are_deterministic_algorithms_enabled()
    acc = torch.int64 if det else torch.float32
    dq, dq_idx, dw = torch.empty_like(q), torch.empty_like(q_idx), torch.empty_like(w)
    dk_acc = torch.zeros(k.shape, dtype=acc, device=k.device)   # keys nobody selected stay 0
    dv_acc = torch.zeros(v.shape, dtype=acc, device=v.device)
    dki_acc = torch.zeros(k_idx.shape, dtype=acc, device=k_idx.device)
    kl = torch.empty(B * T, dtype=torch.float32, device=q.device)
    lse_i, z = torch.empty_like(kl), torch.empty_like(kl)
    fix = attn_bwd_fixed_point_scales(q, k, v, o, do, scale) if det else None
    fix_ki = kl_bwd_fixed_point_scale(q_idx, w, k_idx, gscale) if det else None
    chunks, width = psum_chunks(plan, chunk_bytes or LOSS_CHUNK_BYTES, value_bytes=12 if det else 4)
    buf = torch.empty(max(1, width) * plan.block_q, dtype=acc, device=q.device)
    p32 = torch.empty(max(1, width) * plan.block_q, dtype=torch.float32, device=q.device) if det else None
    for b0, b1, u0, u1 in chunks:
        if b1 <= b0:
            continue
        part = buf[: (u1 - u0) * plan.block_q]
        part.zero_()
        sparse_attn_bwd_blocks(q, k, v, o, do, lse, plan, scale, dq, dk_acc, dv_acc, blocks=(b0, b1), psum=part,
                               u0=u0, fix=fix)
        if det:
            part = p32[: part.numel()].copy_(part).div_(fix[2])
        kl_fwd_from_p(q_idx, w, k_idx, q.shape, k.shape, plan, scale, part, (b0, b1), u0, kl, lse_i, z)
        kl_bwd_blocks(q_idx, w, k_idx, q.shape, k.shape, plan, scale, lse_i, z, gscale, dq_idx, dw, dki_acc, psum=part,
                      blocks=(b0, b1), u0=u0, fix=fix_ki)
    if not det:
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype), dq_idx, dw, dki_acc.to(k_idx.dtype), kl
    # a NaN in the target or the scores (seen in the KL) reaches dk_idx as NaN, not as a wrapped int
    fix_ki = fix_ki + 0.0 * kl.sum()
    return (dq, from_fixed_point(dk_acc, fix[0:1], k.dtype), from_fixed_point(dv_acc, fix[1:2], v.dtype), dq_idx, dw,
            from_fixed_point(dki_acc, fix_ki, k_idx.dtype), kl)


class SparseAttentionKLFn(torch.autograd.Function):
    """o = sparse attention over the plan; its backward also trains the indexer on the sparse KL
    (module docstring). `kl_out` (0-dim fp32) receives mean_t KL_t when the backward runs."""

    @staticmethod
    def forward(ctx, q, k, v, q_idx, w, k_idx, plan: SparsePlan, scale: float, kl_weight: float,
                kl_out: torch.Tensor, chunk_bytes: int | None = None):
        q, k, v, q_idx, w, k_idx = (x.contiguous() for x in (q, k, v, q_idx, w, k_idx))
        o, lse = sparse_attn_fwd(q, k, v, plan, scale)
        ctx.save_for_backward(q, k, v, o, lse, q_idx, w, k_idx)
        ctx.plan, ctx.scale, ctx.kl_weight, ctx.kl_out, ctx.chunk_bytes = plan, scale, kl_weight, kl_out, chunk_bytes
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, q_idx, w, k_idx = ctx.saved_tensors
        n = q.shape[0] * q.shape[1]
        gscale = torch.full((1,), ctx.kl_weight / max(1, n), dtype=torch.float32, device=q.device)
        dq, dk, dv, dq_idx, dw, dk_idx, kl = attention_kl_bwd(
            q, k, v, o, do.contiguous(), lse, q_idx, w, k_idx, ctx.plan, ctx.scale, gscale,
            chunk_bytes=ctx.chunk_bytes)
        ctx.kl_out.copy_(kl.sum() / max(1, n))
        return dq, dk, dv, dq_idx, dw, dk_idx, None, None, None, None, None


class AttachLossFn(torch.autograd.Function):
    """Returns o unchanged; its backward also gives `loss` the gradient `weight`, whatever gradient reaches o
    (the contract of SparseAttentionKLFn for a loss computed apart: the reference backend, block sizes that
    differ, and the model's DSA layer for its other KLs)."""

    @staticmethod
    def forward(ctx, o, loss, weight: float):
        ctx.weight = weight
        ctx.save_for_backward(loss)
        return o.view_as(o)

    @staticmethod
    def backward(ctx, grad):
        (loss,) = ctx.saved_tensors
        return grad, torch.full_like(loss, ctx.weight), None


__all__ = ["attention_kl_bwd", "SparseAttentionKLFn", "AttachLossFn", "LOSS_CHUNK_BYTES"]
