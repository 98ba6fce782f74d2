"""Plain-PyTorch reference for DeepSeek Sparse Attention (DSA) with grouped-query attention.

Everything here is O(T^2) and meant for small shapes: it defines the numbers the Triton kernels
in this folder are tested against. Scores are computed in float64 unless stated otherwise.

Shape legend (suffixes on tensor names):
    B batch, T tokens (queries and keys share one sequence), K top-k slots,
    Hq query heads, Hkv key/value heads (Hq = Hkv * G), D head dim,
    HI indexer heads, DI indexer head dim.

Rules shared with the kernels (see README.md):
    * eligible keys of query t: doc_start(t) <= s <= t (doc_start = 0 without cu_seqlens);
    * ranking: larger score first, ties broken by smaller key position; -0.0 counts as +0.0;
    * a row of `idx` holds the min(K, #eligible) selected positions sorted ascending, then -1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def doc_start(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[B, T] int64: first position of the document that holds each token."""
    if cu_seqlens is None:
        return torch.zeros(B, T, dtype=torch.long, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    pos = torch.arange(T, device=device)
    seg = torch.searchsorted(cu[1:], pos, right=True)
    return cu[seg].view(1, T).expand(B, T).contiguous()


def eligible_mask(B: int, T: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[B, T, T] bool: True where key s may be seen by query t (causal, same document)."""
    start_BT = doc_start(B, T, cu_seqlens, device)
    s = torch.arange(T, device=device).view(1, 1, T)
    t = torch.arange(T, device=device).view(1, T, 1)
    return (s <= t) & (s >= start_BT.unsqueeze(-1))


def index_scores(q_idx_BTHD: torch.Tensor, w_BTH: torch.Tensor, k_idx_BTD: torch.Tensor,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """I[b, t, s] = sum_j w[b, t, j] * relu(q_idx[b, t, j] . k_idx[b, s]), shape [B, T, T]."""
    u_BTHS = torch.einsum("bthd,bsd->bths", q_idx_BTHD.to(dtype), k_idx_BTD.to(dtype))
    return (F.relu(u_BTHS) * w_BTH.to(dtype).unsqueeze(-1)).sum(dim=2)


def topk_indices(q_idx_BTHD: torch.Tensor, w_BTH: torch.Tensor, k_idx_BTD: torch.Tensor, topk: int,
                 cu_seqlens: torch.Tensor | None = None,
                 scores_BTT: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k key positions per query, [B, T, topk] int32, ascending, padded with -1.

    `scores_BTT` overrides the scores (used to rank with exactly the numbers a kernel saw).
    """
    B, T = q_idx_BTHD.shape[:2]
    scores = index_scores(q_idx_BTHD, w_BTH, k_idx_BTD) if scores_BTT is None else scores_BTT
    return rank_topk(scores, eligible_mask(B, T, cu_seqlens, q_idx_BTHD.device), topk)


def rank_topk(scores: torch.Tensor, elig: torch.Tensor, topk: int) -> torch.Tensor:
    """The top-k ranking of scores [..., T] among the eligible keys (elig, same shape): larger score first, -0.0 as
    +0.0, a NaN as -inf, ties to the smaller position; min(topk, eligible) positions ascending, then -1 to topk,
    [..., topk] int32."""
    T = scores.shape[-1]
    scores = torch.where(scores == 0, torch.zeros_like(scores), scores)  # -0.0 ranks as +0.0
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))  # NaN ranks as -inf
    scores = scores.masked_fill(~elig, float("-inf"))
    # A stable descending sort keeps equal scores in ascending position order: the tie-break. Then the eligible
    # keys first (stable again): an eligible key scored -inf (or NaN) ranks after the others, not after the
    # ineligible keys' -inf fill.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    late = (~torch.gather(elig, -1, order)).to(torch.int8)
    order = torch.gather(order, -1, torch.sort(late, dim=-1, stable=True).indices)
    kk = min(topk, T)
    order = order[..., :kk]
    chosen_ok = torch.gather(elig, -1, order)
    big = torch.iinfo(torch.long).max
    order = torch.where(chosen_ok, order, torch.full_like(order, big))
    order = torch.sort(order, dim=-1).values
    order = torch.where(order == big, torch.full_like(order, -1), order)
    if kk < topk:
        order = torch.cat([order, order.new_full((*order.shape[:-1], topk - kk), -1)], dim=-1)
    return order.to(torch.int32)


def selection_mask(idx_BTK: torch.Tensor, T: int) -> torch.Tensor:
    """[B, T, T] bool: True where key s is in the selected set of query t."""
    B = idx_BTK.shape[0]
    valid = idx_BTK >= 0
    m = torch.zeros(B, idx_BTK.shape[1], T + 1, dtype=torch.bool, device=idx_BTK.device)
    m.scatter_(-1, torch.where(valid, idx_BTK.long(), torch.full_like(idx_BTK.long(), T)), True)
    return m[..., :T]


def _attn_logits(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, scale: float, dtype) -> torch.Tensor:
    """[B, Hq, T, T] logits scale * q_h . k_{h // G}."""
    Hq, Hkv = q_BTHD.shape[2], k_BTHD.shape[2]
    k_rep = k_BTHD.repeat_interleave(Hq // Hkv, dim=2)
    return torch.einsum("bthd,bshd->bhts", q_BTHD.to(dtype), k_rep.to(dtype)) * scale


def sparse_gqa_attention(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor,
                         idx_BTK: torch.Tensor, scale: float | None = None,
                         dtype: torch.dtype = torch.float64):
    """Each query head attends over the keys selected for its token. Returns (o, lse).

    o [B, T, Hq, D] in q's dtype, lse [B, T, Hq] float32 (natural log). Differentiable in q, k, v.
    """
    B, T, Hq, D = q_BTHD.shape
    Hkv = k_BTHD.shape[2]
    scale = D ** -0.5 if scale is None else scale
    logits = _attn_logits(q_BTHD, k_BTHD, scale, dtype)
    sel = selection_mask(idx_BTK, T).unsqueeze(1)  # [B, 1, T, T]
    logits = logits.masked_fill(~sel, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hq, T]
    p = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
    v_rep = v_BTHD.repeat_interleave(Hq // Hkv, dim=2).to(dtype)
    o = torch.einsum("bhts,bshd->bthd", p, v_rep)
    return o.to(q_BTHD.dtype), lse.transpose(1, 2).float()


def attention_target(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, mask_BTT: torch.Tensor,
                     scale: float, lse_BTH: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """KL target p [B, T, T]: attention probabilities summed over query heads, L1-normalised over
    the keys in `mask`. With `lse` given, p_h = exp(logit - lse_h) restricted to the mask (i.e. the
    probabilities of that attention, renormalised over the mask); otherwise softmax over the mask.
    Detached: no gradient flows into q or k."""
    with torch.no_grad():
        logits = _attn_logits(q_BTHD, k_BTHD, scale, dtype)
        m = mask_BTT.unsqueeze(1)
        if lse_BTH is None:
            p = torch.softmax(logits.masked_fill(~m, float("-inf")), dim=-1).nan_to_num(0.0)
        else:
            p = torch.exp(logits - lse_BTH.transpose(1, 2).to(dtype).unsqueeze(-1))
            p = torch.where(m, p, torch.zeros_like(p))
        psum = p.sum(dim=1)
        return psum / psum.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def indexer_kl_loss(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, q_idx_BTHD: torch.Tensor,
                    w_BTH: torch.Tensor, k_idx_BTD: torch.Tensor, stage: str,
                    idx_BTK: torch.Tensor | None = None, lse_BTH: torch.Tensor | None = None,
                    scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Mean over tokens of KL(p_t || softmax(I_t)) over the stage's key set.

    stage="dense":  keys = all eligible keys; p from dense causal attention (lse: dense lse, or None
                    to compute it).
    stage="sparse": keys = the selected set idx_t; p = head-summed attention probabilities over the
                    selected set, renormalised (lse: the sparse attention's lse, or None).
    Gradient flows into q_idx, w and k_idx only.
    """
    B, T, Hq, D = q_BTHD.shape
    scale = D ** -0.5 if scale is None else scale
    if stage == "dense":
        mask = eligible_mask(B, T, cu_seqlens, q_BTHD.device)
    elif stage == "sparse":
        mask = selection_mask(idx_BTK, T)
    else:
        raise ValueError(f"stage must be 'dense' or 'sparse', got {stage!r}")
    p = attention_target(q_BTHD, k_BTHD, mask, scale, lse_BTH, dtype)
    scores = index_scores(q_idx_BTHD, w_BTH, k_idx_BTD, dtype)
    return masked_kl(p, scores, mask).mean().float()


def masked_kl(p: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(scores)) per row over the keys the mask keeps (last dim); p is 0 off the mask."""
    logq = torch.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    logq = torch.where(mask, logq, torch.zeros_like(logq))
    return torch.where(mask, torch.xlogy(p, p) - p * logq, torch.zeros_like(p)).sum(dim=-1)


def dense_lse(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, scale: float | None = None,
              cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, Hq] float32 log-sum-exp of dense causal (document-masked) attention logits."""
    B, T, Hq, D = q_BTHD.shape
    scale = D ** -0.5 if scale is None else scale
    logits = _attn_logits(q_BTHD, k_BTHD, scale, torch.float64)
    logits = logits.masked_fill(~eligible_mask(B, T, cu_seqlens, q_BTHD.device).unsqueeze(1),
                                float("-inf"))
    return torch.logsumexp(logits, dim=-1).transpose(1, 2).float()


__all__ = ["doc_start", "eligible_mask", "index_scores", "topk_indices", "selection_mask",
           "sparse_gqa_attention", "attention_target", "indexer_kl_loss", "masked_kl", "dense_lse"]
