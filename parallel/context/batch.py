"""The trainer's hook into context parallelism: one micro-batch -> what the model gets on this CP rank.

`train/trainer.py::_forward_step` calls `split_batch_for_cp` right before the model when parallel.cp > 1,
after KSA summary insertion (so the split is of the interleaved sequence), with the whole packed
sequence on every rank of the CP group (the data stream is keyed by the DP rank, which CP ranks share).

What is split and what is not, and why:
  * tokens, labels, loss mask [b, S] -> [b, S/cp]: the load-balanced layout `split` (`split.split_for_cp`):
    "sequence" = chunks r and 2cp-1-r of the sequence, "document" = chunks r and 2cp-1-r of every
    document of the GLOBAL cu_seqlens (the same `split` must reach the attention: train/ builds
    `ops.ContextParallelAttention(split=...)` from the same config value). The loss is then a sum over
    local tokens; megatron's per-token loss all-reduces the token count over DP x CP and DDP sums
    gradients over DP x CP, so the gradient is sum over every token / global token count, as at cp = 1.
  * position ids [3, b, S] stay GLOBAL-length: megatron-core 0.16.1's MultimodalRotaryEmbedding (built by
    GPTModel with megatron's CP group) computes the embedding for all S positions and slices it with
    `get_pos_emb_on_this_cp_rank` (chunks r and 2cp-1-r of the SEQUENCE) whenever that group has > 1
    rank. Splitting the positions here as well would slice twice (and fail on shapes). With
    split="sequence" they are returned unchanged; with split="document" they are returned PERMUTED so
    that megatron's sequence-chunk slice of them, on every rank, is exactly the positions of that rank's
    tokens (`rotary_positions_for_cp`): RoPE still gets each token's true global (t, h, w) position.
    Only the rotary embedding reads the position ids (mrope has no learned position table).
    The rotary embedding is [S, b, 1, D] per layer call (one per forward, shared by the layers), a few
    MB even at 256K, so computing it whole costs nothing that matters.
  * packed_seq_params (sbhd, batch 1) keeps the GLOBAL cu_seqlens: the CP attention functions need the
    document boundaries of the whole sequence (documents cross rank and chunk boundaries). Where the trainer names
    padding at the row's end (pad_tail), it gains `pad_tail_local`, the part of it that ends this rank's share
    (`split.cp_local_tail`): the DSA attention and the chunked loss leave those rows out.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from parallel.context.comm import group_size_rank
from parallel.context.split import (CPSplit, check_cp_seq_len, cp_local_tail, cp_rank_concat_indices,
                                    rank_concat_to_natural, split_for_cp)

__all__ = ["split_batch_for_cp", "rotary_positions_for_cp", "cp_share"]


def rotary_positions_for_cp(pos: torch.Tensor, cp_size: int, *, split: CPSplit,
                            cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """[3, b, S] position ids arranged so that megatron's rotary slice (chunks r and 2cp-1-r of the
    sequence, `get_pos_emb_on_this_cp_rank`) gives, on every rank r, the positions of the tokens r holds
    in the `split` layout: the identity for "sequence", a permutation for "document"."""
    if split == "sequence" or cu_seqlens is None or cp_size == 1:
        return pos
    seq_len = pos.shape[-1]
    mine = cp_rank_concat_indices(seq_len, cp_size, pos.device, split=split, cu_seqlens=cu_seqlens)
    # megatron's slice on rank r reads the sequence-layout positions of r: put r's own tokens' there
    perm = rank_concat_to_natural(mine, cp_size, dim=0, split="sequence")
    return pos.index_select(-1, perm)


def split_batch_for_cp(tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                       kwargs: dict, cp_group: dist.ProcessGroup | None, *, split: CPSplit
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """This CP rank's (tokens, labels, loss_mask, position_ids, model kwargs) in the `split` layout.

    tokens / labels / mask [b, S] -> [b, S/cp]; pos [3, b, S] global-length, unchanged ("sequence") or
    permuted for megatron's rotary slice ("document", see `rotary_positions_for_cp`);
    kwargs["packed_seq_params"] (if any) with the GLOBAL cu_seqlens, and the share of a trailing padding it names
    that ends this rank's tokens (pad_tail_local). Raises ValueError when S is not
    divisible by 2 * cp or the packed boundaries do not cover the sequence.
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
    cu = None
    if psp is not None:
        cu = psp.cu_seqlens_q
        if tokens.shape[0] != 1:
            raise ValueError("packed sequences (cu_seqlens) under context parallelism need micro batch size 1")
        if int(cu[-1]) != seq_len:
            raise ValueError(f"cu_seqlens end at {int(cu[-1])}, the packed sequence has {seq_len} tokens: "
                             "cu_seqlens must be the GLOBAL boundaries of the whole sequence")
    tokens, labels, mask = (None if t is None else cp_share(t, kwargs, cp_group, split=split)
                            for t in (tokens, labels, mask))
    if getattr(psp, "pad_tail", 0):  # the row's trailing padding ends this rank's share: how much of it
        tail = cp_local_tail(seq_len, cp, rank, psp.pad_tail, split=split, cu_seqlens=cu)
        kwargs = {**kwargs, "packed_seq_params": dataclasses.replace(psp, pad_tail_local=tail)}
    return tokens, labels, mask, rotary_positions_for_cp(pos, cp, split=split, cu_seqlens=cu), kwargs


def cp_share(x: torch.Tensor, kwargs: dict, cp_group: dist.ProcessGroup | None, *, split: CPSplit) -> torch.Tensor:
    """This CP rank's share of another per-token tensor [b, S], in the layout split_batch_for_cp gives the tokens
    (with the same kwargs: a packed row's GLOBAL cu_seqlens decide the "document" split)."""
    cp, rank = group_size_rank(cp_group)
    psp = kwargs.get("packed_seq_params")
    return split_for_cp(x, dim=-1, cp_size=cp, cp_rank=rank, split=split,
                        cu_seqlens=None if psp is None else psp.cu_seqlens_q)
