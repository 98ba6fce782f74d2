"""The trainer's hook into context parallelism: one micro-batch -> what the model gets on this CP rank.

`train/trainer.py::_forward_step` calls `split_batch_for_cp` right before the model when parallel.cp > 1,
after KSA summary insertion (so the split is of the interleaved sequence), with the whole packed
sequence on every rank of the CP group (the data stream is keyed by the DP rank, which CP ranks share).

What is split and what is not, and why:
  * tokens, labels, loss mask [b, S] -> [b, S/cp]: the load-balanced chunks r and 2cp-1-r
    (`split.split_for_cp`). The loss is then a sum over local tokens; megatron's per-token loss
    all-reduces the token count over DP x CP and DDP sums gradients over DP x CP, so the gradient is
    sum over every token / global token count, the same as at cp = 1.
  * position ids [3, b, S] stay GLOBAL: megatron-core 0.16.1's MultimodalRotaryEmbedding (built by
    GPTModel with megatron's CP group) computes the embedding for all S positions and slices it with
    `get_pos_emb_on_this_cp_rank` (chunks r and 2cp-1-r, the same layout as `split.py`) whenever that
    group has > 1 rank. Splitting the positions here as well would slice twice (and fail on shapes).
    The rotary embedding is [S, b, 1, D] per layer call (one per forward, shared by the layers), a few
    MB even at 256K, so computing it whole costs nothing that matters.
  * packed_seq_params (sbhd, batch 1) keeps the GLOBAL cu_seqlens: the CP attention functions need the
    document boundaries of the whole sequence (documents cross rank and chunk boundaries).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.context.comm import group_size_rank
from parallel.context.split import check_cp_seq_len, split_for_cp

__all__ = ["split_batch_for_cp"]


def split_batch_for_cp(tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                       kwargs: dict, cp_group: dist.ProcessGroup | None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """This CP rank's (tokens, labels, loss_mask, position_ids, model kwargs).

    tokens / labels / mask [b, S] -> [b, S/cp]; pos [3, b, S] returned unchanged (global, see module
    docstring); kwargs["packed_seq_params"] (if any) unchanged (global cu_seqlens). Raises ValueError
    when S is not divisible by 2 * cp or the packed boundaries do not cover the sequence.
    """
    cp, rank = group_size_rank(cp_group)
    if cp == 1:
        return tokens, labels, mask, pos, kwargs
    seq_len = tokens.shape[-1]
    check_cp_seq_len(seq_len, cp)
    for name, t in (("labels", labels), ("loss_mask", mask)):
        if t is not None and t.shape != tokens.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} differs from tokens {tuple(tokens.shape)}")
    if pos.shape[-1] != seq_len:
        raise ValueError(f"position_ids cover {pos.shape[-1]} tokens, the sequence has {seq_len}")
    psp = kwargs.get("packed_seq_params")
    if psp is not None:
        cu = psp.cu_seqlens_q
        if tokens.shape[0] != 1:
            raise ValueError("packed sequences (cu_seqlens) under context parallelism need micro batch size 1")
        if int(cu[-1]) != seq_len:
            raise ValueError(f"cu_seqlens end at {int(cu[-1])}, the packed sequence has {seq_len} tokens: "
                             "cu_seqlens must be the GLOBAL boundaries of the whole sequence")
    tokens, labels, mask = (None if t is None else split_for_cp(t, dim=-1, cp_size=cp, cp_rank=rank)
                            for t in (tokens, labels, mask))
    return tokens, labels, mask, pos, kwargs
