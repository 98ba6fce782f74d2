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
  every one of these sums has a fixed order instead (_attention_kl_bwd_det, kernels/dsa/README.md).
"""
from __future__ import annotations

import torch

from .indexer_loss import LOSS_CHUNK_BYTES, kl_bwd_blocks, kl_fwd_from_p, psum_chunks
from .plan import SparsePlan, add_entry_rows, entry_chunks
from .sparse_attn import DET_CHUNK_BYTES, sparse_attn_bwd_blocks, sparse_attn_fwd


def _grad_buffers(q, k, v, q_idx, w, k_idx):
    """Both backwards' outputs: dq, fp32 dk / dv (keys nobody selected stay 0), per-token kl, lse_I and Z, dq_idx, dw,
    fp32 dk_idx."""
    B, T = q.shape[:2]
    kl = torch.empty(B * T, dtype=torch.float32, device=q.device)
    return (torch.empty_like(q), torch.zeros(k.shape, dtype=torch.float32, device=k.device),
            torch.zeros(v.shape, dtype=torch.float32, device=v.device), kl, torch.empty_like(kl), torch.empty_like(kl),
            torch.empty_like(q_idx), torch.empty_like(w), torch.zeros(k_idx.shape, dtype=torch.float32,
                                                                     device=k_idx.device))


def attention_kl_bwd(q, k, v, o, do, lse, q_idx, w, k_idx, plan: SparsePlan, scale: float,
                     gscale: torch.Tensor, chunk_bytes: int | None = None):
    """(dq, dk, dv, dq_idx, dw, dk_idx, kl) for the attention's output gradient `do` and d loss / d KL_t =
    gscale (a 1-element fp32 tensor); kl [B*T] fp32 is each token's KL over its selected keys. The plan's
    block size must be the loss kernels' (`indexer_loss.loss_block_q`). Inputs contiguous.
    With torch's deterministic algorithms on (train.deterministic): no atomics; per chunk the kernels write
    per-entry partials (dk / dv and P per KV group, dk_idx), summed afterwards in a fixed order (chunk_bytes then
    bounds all the partials, default DET_CHUNK_BYTES)."""
    if torch.are_deterministic_algorithms_enabled():
        return _attention_kl_bwd_det(q, k, v, o, do, lse, q_idx, w, k_idx, plan, scale, gscale, chunk_bytes)
    dq, dk32, dv32, kl, lse_i, z, dq_idx, dw, dki32 = _grad_buffers(q, k, v, q_idx, w, k_idx)
    chunks, width = psum_chunks(plan, chunk_bytes or LOSS_CHUNK_BYTES)
    buf = torch.empty(max(1, width) * plan.block_q, dtype=torch.float32, device=q.device)
    for b0, b1, u0, u1 in chunks:
        if b1 <= b0:
            continue
        part = buf[: (u1 - u0) * plan.block_q]
        part.zero_()
        sparse_attn_bwd_blocks(q, k, v, o, do, lse, plan, scale, dq, dk32, dv32, blocks=(b0, b1), psum=part,
                               u0=u0)
        kl_fwd_from_p(q_idx, w, k_idx, q.shape, k.shape, plan, scale, part, (b0, b1), u0, kl, lse_i, z)
        kl_bwd_blocks(q_idx, w, k_idx, q.shape, k.shape, plan, scale, lse_i, z, gscale, dq_idx, dw, dki32, psum=part,
                      blocks=(b0, b1), u0=u0)
    return dq, dk32.to(k.dtype), dv32.to(v.dtype), dq_idx, dw, dki32.to(k_idx.dtype), kl


def _attention_kl_bwd_det(q, k, v, o, do, lse, q_idx, w, k_idx, plan: SparsePlan, scale: float,
                          gscale: torch.Tensor, chunk_bytes: int | None):
    """attention_kl_bwd without atomics. Per chunk of blocks whose per-entry partials fit `chunk_bytes` (default
    DET_CHUNK_BYTES: dk and dv per KV group, P per KV group and summed, dk_idx; 4.3 KB per entry at Keye's shapes):
    the attention backward writes each (entry, group)'s dk / dv and head-summed P once; P is summed over the groups
    in group order (0, 1, ...); the KL kernels read it and write each entry's dk_idx once; dk / dv / dk_idx are added
    per key in a fixed order (plan.add_entry_rows), chunks in order. dq, dq_idx, dw are written once per token, as in
    the atomics path."""
    HKV, D, DI, BQ = k.shape[2], k.shape[3], k_idx.shape[-1], plan.block_q
    row = HKV * D
    dq, dk32, dv32, kl, lse_i, z, dq_idx, dw, dki32 = _grad_buffers(q, k, v, q_idx, w, k_idx)
    chunks, width = entry_chunks(plan, 4 * (2 * row + (HKV + 1) * BQ + DI), chunk_bytes or DET_CHUNK_BYTES)
    width = max(1, width)
    dkv = torch.empty(2, width, row, dtype=torch.float32, device=q.device)
    pg = torch.empty(width, HKV, BQ, dtype=torch.float32, device=q.device)
    p = torch.empty(width, BQ, dtype=torch.float32, device=q.device)
    dki = torch.empty(width, DI, dtype=torch.float32, device=q.device)
    for chunk in chunks:
        b0, b1, u0, u1 = chunk
        if b1 <= b0:
            continue
        n = u1 - u0
        sparse_attn_bwd_blocks(q, k, v, o, do, lse, plan, scale, dq, dkv[0], dkv[1], blocks=(b0, b1), psum=pg,
                               u0=u0, deterministic=True)
        part = p[:n]
        part.copy_(pg[:n, 0])
        for g in range(1, HKV):   # P's sum over the KV groups, in group order
            part.add_(pg[:n, g])
        kl_fwd_from_p(q_idx, w, k_idx, q.shape, k.shape, plan, scale, part, (b0, b1), u0, kl, lse_i, z)
        kl_bwd_blocks(q_idx, w, k_idx, q.shape, k.shape, plan, scale, lse_i, z, gscale, dq_idx, dw, dki, psum=part,
                      blocks=(b0, b1), u0=u0, deterministic=True)
        add_entry_rows(dk32.view(-1, row), plan, chunk, dkv[0])
        add_entry_rows(dv32.view(-1, row), plan, chunk, dkv[1])
        add_entry_rows(dki32.view(-1, DI), plan, chunk, dki)
    return dq, dk32.to(k.dtype), dv32.to(v.dtype), dq_idx, dw, dki32.to(k_idx.dtype), kl


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
