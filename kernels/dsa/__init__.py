"""DeepSeek Sparse Attention (DSA) for grouped-query attention: public API.

    idx  = dsa_topk(q_idx, w, k_idx, topk)                         # [B, T, topk] int32
    o    = sparse_gqa_attention(q, k, v, idx)                      # autograd into q, k, v
    loss = indexer_kl_loss(q, k, q_idx, w, k_idx, stage="sparse", idx=idx, lse=lse)
    o, loss, idx = dsa_attention(q, k, v, q_idx, w, k_idx)         # the three composed

Shapes: q [B, T, Hq, D], k / v [B, T, Hkv, D] (Hq a multiple of Hkv), q_idx [B, T, HI, DI],
w [B, T, HI] (already scaled), k_idx [B, T, DI]; packed documents via cu_seqlens (int32
[num_docs + 1], B == 1). backend="triton" runs the kernels of this folder, backend="naive" the
O(T^2) PyTorch reference (naive.py). Nothing here keeps global state (under TRITON_INTERPRET=1 the first
triton call lets the interpreter take runtime loop bounds: common.fix_interpreter_loop_bounds). See README.md.
"""
from __future__ import annotations

from typing import Literal

import torch

from . import naive
from .common import check_same_device, check_triton_device, row_doc_start, validate_cu_seqlens
from .plan import SparsePlan, build_sparse_plan, default_block_q

Backend = Literal["triton", "naive"]
Stage = Literal["dense", "sparse"]

__all__ = ["dsa_topk", "sparse_gqa_attention", "indexer_kl_loss", "indexer_kl_loss_backward_now",
           "dsa_attention", "build_sparse_plan", "SparsePlan", "default_block_q", "naive"]


def _check_backend(backend: str, x: torch.Tensor | None = None) -> None:
    """backend is known and, for "triton", runs on x's device."""
    if backend not in ("triton", "naive"):
        raise ValueError(f"backend must be 'triton' or 'naive', got {backend!r}")
    if backend == "triton" and x is not None:
        check_triton_device(x)


def _check_indexer(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor) -> None:
    if q_idx.dim() != 4 or w.dim() != 3 or k_idx.dim() != 3:
        raise ValueError("expected q_idx [B, T, HI, DI], w [B, T, HI], k_idx [B, T, DI], got "
                         f"{tuple(q_idx.shape)}, {tuple(w.shape)}, {tuple(k_idx.shape)}")
    B, T, HI, DI = q_idx.shape
    if tuple(w.shape) != (B, T, HI) or tuple(k_idx.shape) != (B, T, DI):
        raise ValueError(f"w must be {(B, T, HI)} and k_idx {(B, T, DI)}, got "
                         f"{tuple(w.shape)} and {tuple(k_idx.shape)}")
    check_same_device(q_idx, w, k_idx)
    # the kernels take q_idx . k_idx as one dot product, which needs one floating dtype
    _check_float("q_idx", q_idx, "w", w, "k_idx", k_idx)
    if q_idx.dtype != k_idx.dtype:
        raise ValueError(f"q_idx and k_idx must have one dtype, got {q_idx.dtype} and {k_idx.dtype}")


def _check_float(*named) -> None:
    """named: name, tensor, name, tensor, ...; each tensor must be floating point."""
    for name, t in zip(named[::2], named[1::2]):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"expected q [B, T, Hq, D] and k [B, T, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if k.shape[:2] != q.shape[:2] or k.shape[3] != D or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)} "
                         "(same B, T, D; Hq a multiple of Hkv)")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must match k {tuple(k.shape)}")
    # the kernels take q . k as one dot product and p . v as another: one floating dtype for all three
    _check_float("q", q, "k", k, *(("v", v) if v is not None else ()))
    if q.dtype != k.dtype or (v is not None and v.dtype != k.dtype):
        raise ValueError(f"q, k{', v' if v is not None else ''} must have one dtype, got {q.dtype}, {k.dtype}"
                         + (f", {v.dtype}" if v is not None else ""))


def dsa_topk(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, topk: int, *,
             cu_seqlens: torch.Tensor | None = None, backend: Backend = "triton",
             **kwargs) -> torch.Tensor:
    """Top-`topk` keys per query by I[t,s] = sum_j w[t,j] relu(q_idx[t,j] . k_idx[s]).

    Returns [B, T, topk] int32: the min(topk, #eligible) best positions (larger score first, ties
    to the smaller position), sorted ascending, padded with -1. Eligible: s <= t and, with
    cu_seqlens, s in t's document. No gradient. Extra kwargs (cap, num_samples, chunk_bytes,
    stats) go to the Triton selector.
    """
    _check_topk_args(q_idx, w, k_idx, topk, cu_seqlens, backend)
    return _select(q_idx, w, k_idx, topk, cu_seqlens, backend, kwargs)


def _check_topk_args(q_idx, w, k_idx, topk: int, cu_seqlens, backend: str) -> int:
    """dsa_topk's checks; returns the longest document (validate_cu_seqlens)."""
    _check_backend(backend, q_idx)
    _check_indexer(q_idx, w, k_idx)
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    return validate_cu_seqlens(cu_seqlens, q_idx.shape[0], q_idx.shape[1])


def _select(q_idx, w, k_idx, topk: int, cu_seqlens, backend: str, kwargs: dict) -> torch.Tensor:
    """dsa_topk after its checks."""
    with torch.no_grad():
        if backend == "naive":
            return naive.topk_indices(q_idx, w, k_idx, topk, cu_seqlens)
        from .topk import dsa_topk_triton
        return dsa_topk_triton(q_idx.detach(), w.detach(), k_idx.detach(), topk, cu_seqlens,
                               **kwargs)


def sparse_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, *,
                         scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                         return_lse: bool = False, plan: SparsePlan | None = None,
                         block_q: int | None = None, backend: Backend = "triton"):
    """Each query head attends over its token's selected keys (idx, -1 = unused slot).

    q [B, T, Hq, D], k / v [B, T, Hkv, D]; query head h uses KV head h // (Hq / Hkv); softmax
    scale defaults to D ** -0.5. Returns o [B, T, Hq, D] (and lse [B, T, Hq] fp32, natural log,
    when return_lse). cu_seqlens is validated and gives the plan the longest document's length
    (a launch setting); the documents themselves are already encoded in idx.
    `plan` (from build_sparse_plan(idx, block_q)) can be shared with indexer_kl_loss.
    """
    _check_backend(backend, q)
    _check_attention(q, k, v)
    check_same_device(q, k, v, idx)
    B, T, Hq, D = q.shape
    longest = validate_cu_seqlens(cu_seqlens, B, T)
    if idx.shape[:2] != (B, T):
        raise ValueError(f"idx {tuple(idx.shape)} must be [B={B}, T={T}, topk]")
    scale = D ** -0.5 if scale is None else float(scale)
    if backend == "naive":
        o, lse = naive.sparse_gqa_attention(q, k, v, idx, scale)
    else:
        from .sparse_attn import SparseGQAAttentionFn
        if plan is None:
            bq = block_q or default_block_q(Hq, k.shape[2])
            if q.is_cuda and bq * (Hq // k.shape[2]) < 16:
                raise ValueError(f"block_q ({bq}) x query heads per KV group ({Hq // k.shape[2]}) must be >= 16 "
                                 "on a GPU (tl.dot needs 16 rows)")
            plan = build_sparse_plan(idx, bq, max_doc_len=longest)
        o, lse = SparseGQAAttentionFn.apply(q, k, v, plan, scale)
    return (o, lse) if return_lse else o


def indexer_kl_loss_backward_now(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor,
                                 w: torch.Tensor, k_idx: torch.Tensor, *, grad: float,
                                 scale: float | None = None,
                                 cu_seqlens: torch.Tensor | None = None,
                                 backend: Backend = "triton") -> torch.Tensor:
    """The dense stage's indexer_kl_loss, back-propagated at once with d(total)/d(loss) = grad into
    q_idx, w and k_idx (those that require grad; e.g. the warm-up layer that delivers its KL in its
    forward). Returns the loss, detached. The same result as
    `(grad * indexer_kl_loss(..., stage="dense")).backward()` (on the Triton backend the two compute the
    same gradients with indexer_loss_dense.py; this one skips autograd)."""
    if backend == "naive" or not torch.is_grad_enabled():
        loss = indexer_kl_loss(q, k, q_idx, w, k_idx, stage="dense", scale=scale, cu_seqlens=cu_seqlens,
                               backend=backend)
        if loss.requires_grad:
            (loss * grad).backward()
        return loss.detach()
    B, T, Hq, D, _ = _check_loss_args(q, k, q_idx, w, k_idx, "dense", cu_seqlens, backend)
    from .indexer_loss_dense import indexer_kl_dense
    scale = D ** -0.5 if scale is None else float(scale)
    return indexer_kl_dense(q_idx, w, k_idx, q, k, row_doc_start(B, T, cu_seqlens, q.device), scale,
                            grad=float(grad))


def _check_loss_args(q, k, q_idx, w, k_idx, stage: str, cu_seqlens, backend: str):
    """indexer_kl_loss's checks; returns B, T, Hq, D and the longest document (validate_cu_seqlens)."""
    _check_backend(backend, q)
    if stage not in ("dense", "sparse"):
        raise ValueError(f"stage must be 'dense' or 'sparse', got {stage!r}")
    _check_loss_shapes(q, k, None, q_idx, w, k_idx)
    B, T, Hq, D = q.shape
    return B, T, Hq, D, validate_cu_seqlens(cu_seqlens, B, T)


def _check_loss_shapes(q, k, v, q_idx, w, k_idx) -> None:
    """The attention and indexer tensors fit each other (v may be None)."""
    _check_attention(q, k, v)
    _check_indexer(q_idx, w, k_idx)
    if q_idx.shape[:2] != q.shape[:2]:
        raise ValueError(f"indexer tensors {tuple(q_idx.shape)} do not match q {tuple(q.shape)}")
    check_same_device(q, k, q_idx)


def indexer_kl_loss(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, w: torch.Tensor,
                    k_idx: torch.Tensor, *, stage: Stage, idx: torch.Tensor | None = None,
                    lse: torch.Tensor | None = None, scale: float | None = None,
                    cu_seqlens: torch.Tensor | None = None, plan: SparsePlan | None = None,
                    block_q: int | None = None, backend: Backend = "triton") -> torch.Tensor:
    """Mean over tokens of KL(p_t || softmax(I_t)), gradient into q_idx, w and k_idx only.

    stage="dense" (warm-up): keys = all eligible keys; p = dense causal attention probabilities
    summed over query heads and L1-normalised. `lse` = the dense attention's [B, T, Hq] lse, or
    None to compute it here (streamed).
    stage="sparse": keys = the selected set `idx`; p = head-summed probabilities
    exp(scale q.k - lse) over the set, renormalised. Pass the sparse attention's lse (the default
    when None: it is recomputed) or a dense lse for "dense p restricted to the set".
    q and k are treated as constants (detached).
    """
    B, T, Hq, D, longest = _check_loss_args(q, k, q_idx, w, k_idx, stage, cu_seqlens, backend)
    if stage == "sparse" and idx is None:
        raise ValueError("stage='sparse' needs idx (the selected keys)")
    # the kernels read idx and lse by row and head without their shapes: a wrong one would be read out of place
    if idx is not None and (idx.dim() != 3 or tuple(idx.shape[:2]) != (B, T) or idx.shape[2] < 1):
        raise ValueError(f"idx {tuple(idx.shape)} must be [B={B}, T={T}, topk]")
    if lse is not None and tuple(lse.shape) != (B, T, Hq):
        raise ValueError(f"lse {tuple(lse.shape)} must be [B={B}, T={T}, Hq={Hq}]")
    check_same_device(q, *(t for t in (idx, lse) if t is not None))
    scale = D ** -0.5 if scale is None else float(scale)
    q, k = q.detach(), k.detach()
    lse = None if lse is None else lse.detach().float()
    if backend == "naive":
        return naive.indexer_kl_loss(q, k, q_idx, w, k_idx, stage, idx_BTK=idx, lse_BTH=lse,
                                     scale=scale, cu_seqlens=cu_seqlens)
    from .indexer_loss import IndexerKLLossFn, loss_block_q
    if stage == "dense":  # block_q, plan: the sparse stage's
        from .indexer_loss_dense import dense_attention_lse, dense_kl_loss
        start = row_doc_start(B, T, cu_seqlens, q.device)
        if lse is None:
            lse = dense_attention_lse(q, k, scale, start)
        return dense_kl_loss(q_idx, w, k_idx, q, k, lse, start, scale)
    if plan is None:
        plan = build_sparse_plan(idx, block_q or loss_block_q(Hq, k.shape[2], q_idx.shape[2]),
                                 max_doc_len=longest)
    if lse is None:
        from .sparse_attn import sparse_attn_fwd
        _, lse = sparse_attn_fwd(q.contiguous(), k.contiguous(), k.contiguous(), plan, scale)
    return IndexerKLLossFn.apply(q_idx, w, k_idx, q, k, lse, plan, scale)


def dsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                  w: torch.Tensor, k_idx: torch.Tensor, *, topk: int = 2048,
                  scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                  block_q: int | None = None, backend: Backend = "triton", with_loss: bool = True,
                  kl_in_backward: float | None = None):
    """Sparse-stage DSA in one call: select, attend, and the sparse indexer KL loss.

    Returns (o, kl_loss, idx). o has gradients into q, k, v; kl_loss into q_idx, w, k_idx (the
    attention target is detached). Train with loss = lm_loss + lambda * kl_loss. The dense warm-up
    stage uses dense attention plus indexer_kl_loss(stage="dense") instead. with_loss=False skips the
    loss (kl_loss is None): for a forward whose loss would be thrown away, such as the first pass of a
    full activation recompute.

    kl_in_backward=weight: the loss rides on o instead. o's backward gives the indexer the gradient
    of weight * kl_loss (whatever gradient reaches o) and computes the loss's target from the
    probabilities it recomputes anyway (fused.py: no loss forward, nothing of the loss kept); kl_loss
    is then a detached 0-dim fp32 tensor, NaN until that backward fills it.
    """
    # cu_seqlens is checked once, and the same host copy gives the plan's longest document
    longest = _check_topk_args(q_idx, w, k_idx, topk, cu_seqlens, backend)
    idx = _select(q_idx, w, k_idx, topk, cu_seqlens, backend, {})
    plan = bq = None
    if backend == "triton":
        # one union plan for both kernels when their block sizes agree (they do at Keye's shapes): the
        # plan costs ~11 ms at 128K tokens on an H200 and 8 bytes per union entry kept for backward
        from .indexer_loss import loss_block_q
        plan = build_sparse_plan(idx, block_q or default_block_q(q.shape[2], k.shape[2]),
                                 max_doc_len=longest)
        bq = block_q or loss_block_q(q.shape[2], k.shape[2], q_idx.shape[2])
        if with_loss and kl_in_backward is not None and bq == plan.block_q:
            from .fused import SparseAttentionKLFn
            _check_loss_shapes(q, k, v, q_idx, w, k_idx)  # cu_seqlens was read once above
            check_same_device(q, k, v, q_idx)
            kl = torch.full((), float("nan"), dtype=torch.float32, device=q.device)
            o = SparseAttentionKLFn.apply(q, k, v, q_idx, w, k_idx, plan,
                                          q.shape[-1] ** -0.5 if scale is None else float(scale),
                                          float(kl_in_backward), kl)
            return o, kl, idx
    o, lse = sparse_gqa_attention(q, k, v, idx, scale=scale, return_lse=True, plan=plan, backend=backend)
    if not with_loss:
        return o, None, idx
    loss = indexer_kl_loss(q, k, q_idx, w, k_idx, stage="sparse", idx=idx, lse=lse, scale=scale,
                           plan=plan if plan is not None and bq == plan.block_q else None, block_q=bq,
                           backend=backend)
    if kl_in_backward is None:
        return o, loss, idx
    # the reference backend, or block sizes that differ: the same contract through a loss attached to o
    from .fused import AttachLossFn
    return AttachLossFn.apply(o, loss, float(kl_in_backward)), loss.detach(), idx
