"""`sdpa`: torch's scaled_dot_product_attention whose backward always receives a contiguous output gradient.

On the H200 with torch 2.11, SDPA's default backend for bf16 attention at head dim 128 (cuDNN) reuses the
backward it prepared for a shape the first time that shape is seen, whatever the strides of the output
gradient it is handed later: a second backward of the same shape whose output gradient is laid out
differently (contiguous after a slice of a longer row, or the other way round) returned dq off by 1.25-1.40
relative, or NaN (bench/probe_sdpa_grad_layout.py; the flash backend was right both ways). A slice arises
wherever attention outputs are concatenated (documents of a packed row, frame-size groups of the ViT, CP
pieces), so the same shape can meet both layouts in one run. Handing every backward a contiguous gradient
keeps one layout per shape for every call made through here; the copy costs one pass over the output."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _ContiguousGrad(torch.autograd.Function):
    """Identity; its backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, **kwargs), its output gradient made contiguous (module doc)."""
    return _ContiguousGrad.apply(F.scaled_dot_product_attention(q, k, v, **kwargs))
