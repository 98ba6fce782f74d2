"""Kwai Summary Attention (KSA): public API.

    ksa_attention(q, k, v, *, chunk, window, num_summary=1, cu_seqlens=None, scale=None, backend="triton")

q [B, T, Hq, D], k/v [B, T, Hkv, D] on the interleaved layout (inside each document, token i is a
summary slot iff i % (chunk + num_summary) >= chunk; see README.md and models/ksa_tokens.py).
Backends: "triton" (fused kernels, forward and backward), "naive" (dense mask, fp32, small sizes),
"flex" (FlexAttention with a mask_mod; eager here, the benchmark compiles it; no CPU backward).
"""
from __future__ import annotations

from typing import Literal

import torch

from .attention import KSAKernelConfig, check_inputs, default_config, ksa_attention_triton
from .flex import ksa_attention_flex, ksa_flex_block_mask, ksa_flex_mask_mod
from .naive import ksa_attention_naive, ksa_mask, ksa_mask_from_info, ksa_token_info

__all__ = [
    "ksa_attention", "ksa_attention_triton", "ksa_attention_naive", "ksa_attention_flex",
    "ksa_mask", "ksa_mask_from_info", "ksa_token_info", "ksa_flex_mask_mod", "ksa_flex_block_mask",
    "KSAKernelConfig", "default_config", "Backend",
]

Backend = Literal["triton", "naive", "flex"]


def ksa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk: int, window: int, num_summary: int = 1,
    cu_seqlens: torch.Tensor | None = None, scale: float | None = None, backend: Backend = "triton",
) -> torch.Tensor:
    """KSA on the interleaved layout; returns [B, T, Hq, D] in q's dtype.

    chunk: text tokens per chunk (C); num_summary: summary slots after each complete chunk (S);
    window: previous chunks whose raw text a text query sees (W >= 0; larger than the sequence is
    allowed and means "all text, no summaries"); cu_seqlens: [docs+1] interleaved document
    boundaries for packed input (batch must be 1), documents never see each other.
    """
    check_inputs(q, k, v, chunk=chunk, window=window, num_summary=num_summary, cu_seqlens=cu_seqlens)
    T = q.shape[1]
    kw = dict(chunk=chunk, window=window, num_summary=num_summary, cu_seqlens=cu_seqlens, scale=scale)
    if backend == "triton":
        if cu_seqlens is not None and not cu_seqlens.is_cuda:
            ksa_token_info(T, cu_seqlens=cu_seqlens)  # validates boundaries (free on CPU; skipped on GPU: no sync)
        return ksa_attention_triton(q, k, v, **kw)
    if backend == "naive":
        return ksa_attention_naive(q, k, v, **kw)
    if backend == "flex":
        return ksa_attention_flex(q, k, v, **kw)
    raise ValueError(f"backend must be 'triton', 'naive' or 'flex', got {backend!r}")
