"""Mask-based PyTorch reference for Kwai Summary Attention (KSA) on the interleaved layout.

Everything here is O(T^2) in memory and meant for small sizes: it is the ground truth the Triton
kernel (`attention.py`) and the FlexAttention path (`flex.py`) are tested against.

Shapes legend
    B  batch rows (1 when `cu_seqlens` packs several documents into one row)
    T  tokens of the interleaved sequence (text and summary slots)
    Hq query heads, Hkv key/value heads (GQA: Hq % Hkv == 0), D head dim

Layout (see README.md): inside each document, token i is a summary slot iff
``i % (chunk + num_summary) >= chunk``; its chunk is ``i // (chunk + num_summary)``.

Mask rule (True = the query may attend to the key), within one document only, always causal:
    summary query of chunk c : text and summaries of chunk c (causally)
    text query of chunk c    : text of chunks c-W .. c (own chunk causally),
                               summaries of chunks < c-W (never text and summary of one chunk)
"""
from __future__ import annotations

import torch

__all__ = ["ksa_token_info", "ksa_mask", "ksa_mask_from_info", "ksa_attention_naive"]


def _check_args(chunk: int, num_summary: int, window: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if num_summary < 1:
        raise ValueError(f"num_summary must be >= 1, got {num_summary}")
    if window < 0:
        raise ValueError(f"window must be >= 0 chunks, got {window}")


def ksa_token_info(
    num_tokens: int, *, cu_seqlens: torch.Tensor | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Document id and document-local index of every interleaved token: two int64 [T] tensors."""
    if cu_seqlens is None:
        doc = torch.zeros(num_tokens, dtype=torch.long, device=device)
        local = torch.arange(num_tokens, device=device)
        return doc, local
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if cu.ndim != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != num_tokens:
        raise ValueError(
            f"cu_seqlens must be 1-D, start at 0 and end at the number of tokens ({num_tokens}); "
            f"got {cu.tolist()}"
        )
    lengths = cu.diff()
    if (lengths < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    local = torch.arange(num_tokens, device=cu.device) - cu[doc]
    return doc, local


def ksa_mask_from_info(
    doc_q: torch.Tensor, local_q: torch.Tensor, doc_k: torch.Tensor, local_k: torch.Tensor,
    *, chunk: int, window: int, num_summary: int = 1,
) -> torch.Tensor:
    """The KSA rule on broadcastable (doc id, local index) tensors of queries and keys.

    Elementwise, so it serves both the dense boolean mask and FlexAttention's `mask_mod`.
    """
    period = chunk + num_summary
    cq, ck = local_q // period, local_k // period
    q_sum = (local_q % period) >= chunk
    k_sum = (local_k % period) >= chunk
    causal = local_k <= local_q
    summary_query = q_sum & (ck == cq)
    text_query = ~q_sum & ((~k_sum & (ck >= cq - window)) | (k_sum & (ck < cq - window)))
    return (doc_q == doc_k) & causal & (summary_query | text_query)


def ksa_mask(
    num_tokens: int, *, chunk: int, window: int, num_summary: int = 1,
    cu_seqlens: torch.Tensor | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean [T, T] mask (query rows, key columns) of KSA on the interleaved layout."""
    _check_args(chunk, num_summary, window)
    doc, local = ksa_token_info(num_tokens, cu_seqlens=cu_seqlens, device=device)
    return ksa_mask_from_info(
        doc[:, None], local[:, None], doc[None, :], local[None, :],
        chunk=chunk, window=window, num_summary=num_summary,
    )


def ksa_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk: int, window: int, num_summary: int = 1,
    cu_seqlens: torch.Tensor | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Masked softmax attention in fp32: q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D] (q.dtype)."""
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        raise ValueError(f"expected q [B,T,Hq,D], k/v [B,T,Hkv,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed input (cu_seqlens) needs batch 1, got {B}")
    scale = D ** -0.5 if scale is None else scale
    mask = ksa_mask(T, chunk=chunk, window=window, num_summary=num_summary, cu_seqlens=cu_seqlens, device=q.device)
    qf = q.float().transpose(1, 2)                                       # [B, Hq, T, D]
    kf = k.float().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)   # [B, Hq, T, D]
    vf = v.float().transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf                             # every row sees itself: no empty rows
    return out.transpose(1, 2).to(q.dtype)
