"""Load-balanced causal split of a (packed) sequence over context-parallel (CP) ranks.

Why: with causal attention, token t attends to the keys from its document's start to t, so giving rank r
the contiguous slice r of the sequence makes the last rank do ~2*cp - 1 times the work of the first.
Two balanced layouts (`split`):

* "sequence" (megatron-core's sbhd convention): the whole sequence is cut into 2*cp equal chunks and rank
  r holds chunks r and 2*cp - 1 - r (one cheap early chunk, one expensive late chunk). Every rank has
  exactly the same causal (query, key) pairs for ONE document, but not for a pack: the pairs are counted
  per document, so a pack of one long video and short documents leaves some ranks with little work.
* "document" (megatron's THD convention, without its padding): EVERY document of length L is cut into
  2*cp chunks of q = L // (2*cp) tokens and rank r holds chunk r and chunk 2*cp - 1 - r of each one. The
  last L % (2*cp) tokens of each document (fewer than 2*cp) form the "remainder"; the remainders of all
  documents, concatenated in order, are cut into 2*cp equal chunks and dealt the same way (chunks r and
  2*cp-1-r). Their total is divisible by 2*cp whenever S is (S = 2*cp*sum(q) + total remainder), so every
  rank holds exactly S / cp tokens, no padding is inserted, and positions / loss masks are untouched.
  Documents whose lengths are multiples of 2*cp are split exactly like megatron's THD path (and one
  document, or no cu_seqlens, gives exactly the "sequence" split).

Conventions (one packed micro-batch; shape suffixes in names: S global tokens, N = S / cp local
tokens, B batch, H hidden):
  * a rank's tokens are kept in ascending global order (for "sequence": chunk r, then chunk 2cp-1-r);
    `cp_global_indices` says which they are, `cp_rank_concat_indices` is the order of an all-gather /
    Ulysses all-to-all over the group (rank 0's tokens, then rank 1's, ...);
  * every per-token tensor (input ids, labels, loss mask, position ids [3, B, S], embeddings [S, B, H])
    is split along its token dim with `split_for_cp`;
  * `cu_seqlens` is NOT split: it stays global (documents cross rank boundaries), the attention functions
    take the global one, and the "document" layout is a function of it (pass the same cu_seqlens and
    `split` to every function here for one micro-batch);
  * positions are taken from the global position ids, so 3D multimodal RoPE gets each token's true
    (t, h, w) position wherever it landed.
Nothing here reads global process-group state: ranks and sizes are arguments.
"""
from __future__ import annotations

import functools
import weakref
from typing import Literal, Sequence

import torch

__all__ = [
    "CPSplit", "CP_SPLITS", "check_cp_seq_len", "cp_chunk_bounds", "cp_global_indices", "cp_rank_concat_indices",
    "cp_local_tail", "split_for_cp", "unsplit_from_cp", "natural_to_rank_concat", "rank_concat_to_natural",
    "causal_pairs_per_rank",
]

CPSplit = Literal["sequence", "document"]
CP_SPLITS = ("sequence", "document")


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


_last_cu: list = [None, -1, ()]  # (weakref to the last cu_seqlens tensor, its _version, its values)


def _host_bounds(cu: torch.Tensor) -> tuple[int, ...]:
    """cu_seqlens on the host. Every layer passes the same tensor: read it (a device sync on a GPU) once."""
    ref, version, values = _last_cu
    if ref is not None and ref() is cu and version == cu._version:
        return values
    values = tuple(int(x) for x in cu.reshape(-1).tolist())
    _last_cu[:] = [weakref.ref(cu), cu._version, values]
    return values


def _bounds(seq_len: int, split: str, cu_seqlens: torch.Tensor | Sequence[int] | None) -> tuple[int, ...] | None:
    """The document boundaries the layout depends on (None: the plain "sequence" layout)."""
    if split not in CP_SPLITS:
        raise ValueError(f"CP split must be one of {CP_SPLITS}, got {split!r}")
    if split == "sequence" or cu_seqlens is None:
        return None
    b = _host_bounds(cu_seqlens) if isinstance(cu_seqlens, torch.Tensor) else tuple(int(x) for x in cu_seqlens)
    if len(b) < 2 or b[0] != 0 or b[-1] != seq_len or any(e < s for s, e in zip(b[:-1], b[1:])):
        raise ValueError(f"cu_seqlens must be the GLOBAL non-decreasing document boundaries from 0 to the "
                         f"sequence length {seq_len}, got {list(b[:4])}{'...' if len(b) > 4 else ''}{b[-1:]}")
    return None if len(b) == 2 else b


def _take(segments: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """Global runs of the offsets [lo, hi) of the concatenation of `segments`."""
    out, off = [], 0
    for s, e in segments:
        n = e - s
        a, b = max(lo, off), min(hi, off + n)
        if a < b:
            out.append((s + a - off, s + b - off))
        off += n
        if off >= hi:
            break
    return out


def _merge(runs: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for s, e in sorted(r for r in runs if r[1] > r[0]):
        if out and out[-1][1] == s:
            out[-1][1] = e
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


@functools.lru_cache(maxsize=64)
def _runs(seq_len: int, cp_size: int, bounds: tuple[int, ...] | None) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per rank: the [start, end) global runs it holds, in its local order."""
    c = check_cp_seq_len(seq_len, cp_size)
    n2 = 2 * cp_size
    if bounds is None:  # "sequence" (megatron's convention, chunks kept unmerged)
        return tuple(((r * c, (r + 1) * c), ((n2 - 1 - r) * c, (n2 - r) * c)) for r in range(cp_size))
    runs: list[list[tuple[int, int]]] = [[] for _ in range(cp_size)]
    rest: list[tuple[int, int]] = []  # the remainders (last L % 2cp tokens) of every document, in order
    for ds, de in zip(bounds[:-1], bounds[1:]):
        q = (de - ds) // n2
        if q:
            for r in range(cp_size):
                runs[r].append((ds + r * q, ds + (r + 1) * q))
                runs[r].append((ds + (n2 - 1 - r) * q, ds + (n2 - r) * q))
        if ds + n2 * q < de:
            rest.append((ds + n2 * q, de))
    total = sum(e - s for s, e in rest)
    assert total % n2 == 0, (total, n2)  # S and every document's 2cp*q are multiples of 2cp
    cr = total // n2
    if cr:
        for r in range(cp_size):
            runs[r] += _take(rest, r * cr, (r + 1) * cr) + _take(rest, (n2 - 1 - r) * cr, (n2 - r) * cr)
    return tuple(_merge(rr) for rr in runs)


@functools.lru_cache(maxsize=16)
def _rank_concat_cpu(seq_len: int, cp_size: int, bounds: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank-concatenated global positions [S], its inverse permutation [S]), int64 on the CPU."""
    runs = [r for rank_runs in _runs(seq_len, cp_size, bounds) for r in rank_runs]
    starts = torch.tensor([s for s, _ in runs], dtype=torch.long)
    lens = torch.tensor([e - s for s, e in runs], dtype=torch.long)
    offsets = torch.cumsum(lens, 0) - lens
    order = torch.repeat_interleave(starts - offsets, lens) + torch.arange(seq_len)
    assert order.numel() == seq_len
    return order, torch.argsort(order)


@functools.lru_cache(maxsize=16)
def _rank_concat_on(seq_len: int, cp_size: int, bounds, device: str, inverse: bool) -> torch.Tensor:
    return _rank_concat_cpu(seq_len, cp_size, bounds)[1 if inverse else 0].to(device)


def _rank_concat(seq_len: int, cp_size: int, bounds, device, *, inverse: bool = False) -> torch.Tensor:
    """The cached permutation on `device` (read-only: callers must not modify it)."""
    return _rank_concat_on(seq_len, cp_size, bounds, str(torch.device(device or "cpu")), inverse)


def cp_chunk_bounds(seq_len: int, cp_size: int, cp_rank: int, *, split: CPSplit = "sequence",
                    cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> list[tuple[int, int]]:
    """The [start, end) global token runs that rank `cp_rank` holds, in local order ("sequence": the two
    chunks r and 2cp-1-r; "document": the merged runs of every document's two chunks and the remainders)."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp = {cp_size}")
    return list(_runs(seq_len, cp_size, _bounds(seq_len, split, cu_seqlens))[cp_rank])


def cp_local_tail(seq_len: int, cp_size: int, cp_rank: int, tail: int, *, split: CPSplit = "sequence",
                  cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> int:
    """How many of the tokens rank `cp_rank` holds lie in the row's last `tail` tokens (its trailing padding). A
    rank keeps its tokens in ascending global order, so they end its share; 0 when they would be all of it (a
    rank's computation then goes on as for a row without padding, which keeps its collectives' graph)."""
    if tail <= 0:
        return 0
    first = seq_len - tail
    runs = cp_chunk_bounds(seq_len, cp_size, cp_rank, split=split, cu_seqlens=cu_seqlens)
    held = sum(e - a for a, e in runs)
    mine = sum(e - max(a, first) for a, e in runs if e > first)
    return 0 if mine >= held else mine


def cp_rank_concat_indices(seq_len: int, cp_size: int, device: torch.device | str | None = None, *,
                           split: CPSplit = "sequence",
                           cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """[S] int64: global positions of the concatenation rank 0 | rank 1 | ... of the local tensors.

    This is the order of the sequence after an all-gather or a Ulysses all-to-all over the CP group.
    """
    return _rank_concat(seq_len, cp_size, _bounds(seq_len, split, cu_seqlens), device).clone()


def cp_global_indices(seq_len: int, cp_size: int, cp_rank: int, device: torch.device | str | None = None, *,
                      split: CPSplit = "sequence",
                      cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """[S / cp] int64: global position of each token the rank holds, in local order."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} out of range for cp = {cp_size}")
    n = seq_len // cp_size
    order = _rank_concat(seq_len, cp_size, _bounds(seq_len, split, cu_seqlens), device)
    return order[cp_rank * n:(cp_rank + 1) * n].clone()


def rank_concat_to_natural(x: torch.Tensor, cp_size: int, *, dim: int, split: CPSplit = "sequence",
                           cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Reorder a full-length tensor from rank-concatenated order to natural order (differentiable)."""
    if cp_size == 1:
        return x
    seq_len = x.shape[dim]
    return x.index_select(dim, _rank_concat(seq_len, cp_size, _bounds(seq_len, split, cu_seqlens), x.device,
                                            inverse=True))


def natural_to_rank_concat(x: torch.Tensor, cp_size: int, *, dim: int, split: CPSplit = "sequence",
                           cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of `rank_concat_to_natural` (differentiable)."""
    if cp_size == 1:
        return x
    seq_len = x.shape[dim]
    return x.index_select(dim, _rank_concat(seq_len, cp_size, _bounds(seq_len, split, cu_seqlens), x.device))


def split_for_cp(x: torch.Tensor, *, dim: int, cp_size: int, cp_rank: int, split: CPSplit = "sequence",
                 cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """The rank's share of a per-token tensor along `dim` (its runs, concatenated in local order).

    Works for any per-token tensor: ids / labels / loss mask [B, S], position ids [3, B, S]
    (dim=-1), embeddings [S, B, H] (dim=0). Differentiable (the gradient scatters back).
    """
    if cp_size == 1:
        return x
    runs = cp_chunk_bounds(x.shape[dim], cp_size, cp_rank, split=split, cu_seqlens=cu_seqlens)
    if len(runs) <= 8:
        return torch.cat([x.narrow(dim, a, b - a) for a, b in runs], dim=dim)
    return x.index_select(dim, cp_global_indices(x.shape[dim], cp_size, cp_rank, x.device, split=split,
                                                 cu_seqlens=cu_seqlens))


def unsplit_from_cp(parts: list[torch.Tensor], *, dim: int, split: CPSplit = "sequence",
                    cu_seqlens: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
    """Inverse of `split_for_cp` given every rank's share (rank order): the natural-order tensor."""
    return rank_concat_to_natural(torch.cat(parts, dim=dim), len(parts), dim=dim, split=split, cu_seqlens=cu_seqlens)


def causal_pairs_per_rank(seq_len: int, cp_size: int, cu_seqlens: torch.Tensor | Sequence[int] | None = None, *,
                          split: CPSplit = "sequence") -> list[int]:
    """Causal (query, key) pairs each rank's queries attend to (the attention work per rank).

    With cu_seqlens, only pairs inside one document count (keys from the query's document start to the
    query), and `split` chooses the layout ("document" depends on cu_seqlens).
    """
    pos = torch.arange(seq_len)
    if cu_seqlens is None:
        start = torch.zeros(seq_len, dtype=torch.long)
    else:
        cu = torch.as_tensor(cu_seqlens).to(torch.long)
        start = cu[torch.searchsorted(cu[1:], pos, right=True)]
    keys = pos - start + 1
    return [int(keys[cp_global_indices(seq_len, cp_size, r, split=split, cu_seqlens=cu_seqlens)].sum())
            for r in range(cp_size)]
