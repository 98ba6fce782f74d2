"""FlexAttention path for KSA on the interleaved layout: the benchmark baseline and a CPU cross-check.

A `mask_mod` evaluates the KSA rule (naive.ksa_mask_from_info) per (query, key) pair from per-token
document ids and local indices. With interleaved summary tokens almost no 128x128 block is empty,
so this path costs about as much as dense causal attention at the same length (see README.md);
it exists to be beaten. Forward only on CPU (FlexAttention has no CPU backward).

Shapes: q [B, T, Hq, D], k/v [B, T, Hkv, D] (same as `ksa_attention`).
"""
from __future__ import annotations

from typing import Callable

import torch

from .naive import _check_args, ksa_mask_from_info, ksa_token_info

__all__ = ["ksa_flex_mask_mod", "ksa_flex_block_mask", "ksa_attention_flex"]


def ksa_flex_mask_mod(
    num_tokens: int, *, chunk: int, window: int, num_summary: int = 1,
    cu_seqlens: torch.Tensor | None = None, device: torch.device | str | None = None,
) -> Callable:
    """A FlexAttention `mask_mod(b, h, q_idx, kv_idx)` for KSA over T interleaved tokens."""
    _check_args(chunk, num_summary, window)
    doc, local = ksa_token_info(num_tokens, cu_seqlens=cu_seqlens, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        return ksa_mask_from_info(
            doc[q_idx], local[q_idx], doc[kv_idx], local[kv_idx],
            chunk=chunk, window=window, num_summary=num_summary,
        )

    return mask_mod


def ksa_flex_block_mask(
    num_tokens: int, *, chunk: int, window: int, num_summary: int = 1,
    cu_seqlens: torch.Tensor | None = None, device: torch.device | str | None = None,
    compile_builder: bool = False,
):
    """BlockMask for `flex_attention`; `compile_builder=True` is needed at 128K (the eager builder OOMs)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = ksa_flex_mask_mod(
        num_tokens, chunk=chunk, window=window, num_summary=num_summary, cu_seqlens=cu_seqlens, device=device
    )
    return create_block_mask(mask_mod, None, None, num_tokens, num_tokens, device=device, _compile=compile_builder)


def ksa_attention_flex(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk: int, window: int, num_summary: int = 1,
    cu_seqlens: torch.Tensor | None = None, scale: float | None = None, block_mask=None,
    flex_fn: Callable | None = None,
) -> torch.Tensor:
    """KSA through FlexAttention. `flex_fn` may be a `torch.compile`d flex_attention (the benchmark's);
    the default is the eager one (slow, for small CPU checks)."""
    from torch.nn.attention.flex_attention import flex_attention

    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B,T,Hq,D], k/v [B,T,Hkv,D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    B, T, Hq, D = q.shape
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed input (cu_seqlens) needs batch 1, got {B}")
    if block_mask is None:
        block_mask = ksa_flex_block_mask(
            T, chunk=chunk, window=window, num_summary=num_summary, cu_seqlens=cu_seqlens, device=q.device
        )
    fn = flex_attention if flex_fn is None else flex_fn
    out = fn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
