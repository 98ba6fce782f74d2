"""The context-parallel attention functions as one object, for injection into the model.

models/ may not import parallel/, so the attention modules call context parallelism through the
interface `models.attention.cp.ContextParallelOps`. `ContextParallelAttention` implements it with this
package's functions and fixes the token layout (`split`) once: train/ builds one from the config
(`parallel.cp_split`), passes it to `models.lm.build_lm(..., cp_ops=...)` and splits every micro-batch
with the same `split` (`batch.split_batch_for_cp`). Nothing is registered globally.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.context.attention import check_cp_heads, dense_cp_attention, ksa_cp_attention, ksa_summary_mask_for_cp
from parallel.context.comm import group_size_rank
from parallel.context.dsa import dsa_cp_attention
from parallel.context.split import CP_SPLITS, CPSplit

__all__ = ["ContextParallelAttention"]


@dataclass(frozen=True)
class ContextParallelAttention:
    """`models.attention.cp.ContextParallelOps` for the token layout `split` ("sequence" | "document")."""

    split: CPSplit = "document"

    def __post_init__(self) -> None:
        if self.split not in CP_SPLITS:
            raise ValueError(f"parallel.cp_split must be one of {CP_SPLITS}, got {self.split!r}")

    def check_heads(self, num_q_heads: int, num_kv_heads: int, cp_size: int) -> None:
        check_cp_heads(num_q_heads, num_kv_heads, cp_size)

    def dense(self, query, key, value, *, cp_group, scale: float, cu_seqlens=None, dropout_p: float = 0.0,
              cp_comm: str = "a2a", pad_tail: tuple[int, int] = (0, 0)) -> torch.Tensor:
        return dense_cp_attention(query, key, value, cp_group=cp_group, scale=scale, cu_seqlens=cu_seqlens,
                                  dropout_p=dropout_p, cp_comm=cp_comm, split=self.split, pad_tail=pad_tail)

    def dsa(self, query, key, value, q_idx, w, k_idx, *, cp_group, topk: int, stage: str, scale: float,
            cu_seqlens=None, backend: str = "auto", dense_cp_comm: str = "a2a",
            kl_grad: float | None = None, with_kl: bool = True,
            kl_in_backward: float | None = None,
            pad_tail: tuple[int, int] = (0, 0), local_tail: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        r = dsa_cp_attention(query, key, value, q_idx, w, k_idx, cp_group=cp_group, topk=topk, stage=stage,
                             scale=scale, cu_seqlens=cu_seqlens, backend=backend, dense_cp_comm=dense_cp_comm,
                             split=self.split, kl_grad=kl_grad, with_kl=with_kl, kl_in_backward=kl_in_backward,
                             pad_tail=pad_tail, local_tail=local_tail)
        return r.out, r.kl

    def ksa(self, query, key, value, *, cp_group, chunk: int, window: int, num_summary: int = 1, cu_seqlens=None,
            scale: float | None = None, backend: str = "auto", pad_tail: tuple[int, int] = (0, 0)) -> torch.Tensor:
        return ksa_cp_attention(query, key, value, cp_group=cp_group, chunk=chunk, window=window,
                                num_summary=num_summary, cu_seqlens=cu_seqlens, scale=scale, backend=backend,
                                split=self.split, pad_tail=pad_tail)

    def summary_mask(self, seq_len: int, batch: int, *, chunk: int, num_summary: int, cu_seqlens, cp_group,
                     device) -> torch.Tensor:
        cp, rank = group_size_rank(cp_group)
        return ksa_summary_mask_for_cp(seq_len, batch, chunk=chunk, num_summary=num_summary, cu_seqlens=cu_seqlens,
                                       cp_size=cp, cp_rank=rank, device=device, split=self.split)
