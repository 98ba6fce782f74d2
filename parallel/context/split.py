"""Load-balanced causal split of a (packed) sequence over context-parallel (CP) ranks.

Why this layout: with causal attention, token t attends to t + 1 keys, so giving rank r the
contiguous slice r of the sequence makes the last rank do ~2*cp - 1 times the work of the first.
As in megatron-core, the sequence is cut into 2*cp equal chunks and rank r holds chunks r and
2*cp - 1 - r (one cheap early chunk, one expensive late chunk): every rank then has exactly the
same number of causal (query, key) pairs when there are no document boundaries.

Conventions (one packed micro-batch; shape suffixes in names: S global tokens, N = S / cp local
tokens, B batch, H hidden):
  * every per-token tensor (input ids, labels, loss mask, position ids [3, B, S], embeddings
    [S, B, H]) is split along its token dim with `split_for_cp`; the rank's tokens keep the order
    (chunk r, then chunk 2cp-1-r);
  * `cu_seqlens` is NOT split: it stays global, documents may cross rank and chunk boundaries, and
    the attention functions of this package take the global one;
  * positions are taken from the global position ids (split like any other tensor), so 3D
    multimodal RoPE gets each token's true (t, h, w) position regardless of where it landed.
Nothing here reads global process-group state: ranks and sizes are arguments.
"""
from __future__ import annotations

import torch

__all__ = [
    "check_cp_seq_len", "cp_chunk_bounds", "cp_global_indices", "cp_rank_concat_indices",
    "split_for_cp", "unsplit_from_cp", "natural_to_rank_concat", "rank_concat_to_natural",
    "causal_pairs_per_rank",
]


def check_cp_seq_len(seq_len: int, cp_size: int) -> int:
    """Validate and return the chunk length seq_len / (2 * cp_size)."""
    if cp_size < 1:
        raise ValueError(f"context parallel size must be >= 1, got {cp_size}")
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_len} is not divisible by 2 * cp = {2 * cp_size} (cp = {cp_size}): "
            f"the load-balanced split cuts it into {2 * cp_size} equal chunks; pad the packed sequence "
            f"to a multiple of {2 * cp_size}")
    return seq_len // (2 * cp_size)


def cp_chunk_bounds(seq_len: int, cp_size: int, cp_rank: int) -> list[tuple[int, int]]:
    """The two [start, end) global token ranges that rank `cp_rank` holds, in local order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp = {cp_size}")
    c = check_cp_seq_len(seq_len, cp_size)
    late = 2 * cp_size - 1 - cp_rank
    return [(cp_rank * c, (cp_rank + 1) * c), (late * c, (late + 1) * c)]


def cp_global_indices(seq_len: int, cp_size: int, cp_rank: int,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """[S / cp] int64: global position of each token the rank holds, in local order."""
    return torch.cat([torch.arange(a, b, device=device) for a, b in cp_chunk_bounds(seq_len, cp_size, cp_rank)])


def cp_rank_concat_indices(seq_len: int, cp_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[S] int64: global positions of the concatenation rank 0 | rank 1 | ... of the local tensors.

    This is the order of the sequence after an all-gather or a Ulysses all-to-all over the CP group.
    """
    return torch.cat([cp_global_indices(seq_len, cp_size, r, device) for r in range(cp_size)])


def rank_concat_to_natural(x: torch.Tensor, cp_size: int, *, dim: int) -> torch.Tensor:
    """Reorder a full-length tensor from rank-concatenated order to natural order (differentiable)."""
    if cp_size == 1:
        return x
    g = cp_rank_concat_indices(x.shape[dim], cp_size, x.device)
    return x.index_select(dim, torch.argsort(g))


def natural_to_rank_concat(x: torch.Tensor, cp_size: int, *, dim: int) -> torch.Tensor:
    """Inverse of `rank_concat_to_natural` (differentiable)."""
    if cp_size == 1:
        return x
    return x.index_select(dim, cp_rank_concat_indices(x.shape[dim], cp_size, x.device))


def split_for_cp(x: torch.Tensor, *, dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The rank's share of a per-token tensor along `dim` (chunks r and 2cp-1-r, concatenated).

    Works for any per-token tensor: ids / labels / loss mask [B, S], position ids [3, B, S]
    (dim=-1), embeddings [S, B, H] (dim=0). Differentiable (the gradient scatters back).
    """
    if cp_size == 1:
        return x
    seq_len = x.shape[dim]
    parts = [x.narrow(dim, a, b - a) for a, b in cp_chunk_bounds(seq_len, cp_size, cp_rank)]
    return torch.cat(parts, dim=dim)


def unsplit_from_cp(parts: list[torch.Tensor], *, dim: int) -> torch.Tensor:
    """Inverse of `split_for_cp` given every rank's share (rank order): the natural-order tensor."""
    return rank_concat_to_natural(torch.cat(parts, dim=dim), len(parts), dim=dim)


def causal_pairs_per_rank(seq_len: int, cp_size: int, cu_seqlens: torch.Tensor | None = None) -> list[int]:
    """Causal (query, key) pairs each rank's queries attend to (the attention work per rank).

    With cu_seqlens, only pairs inside one document count (keys from the query's document start).
    """
    pos = torch.arange(seq_len)
    if cu_seqlens is None:
        start = torch.zeros(seq_len, dtype=torch.long)
    else:
        cu = cu_seqlens.to(torch.long)
        start = cu[torch.searchsorted(cu[1:], pos, right=True)]
    keys = pos - start + 1
    return [int(keys[cp_global_indices(seq_len, cp_size, r)].sum()) for r in range(cp_size)]
