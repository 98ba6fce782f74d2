"""Dense causal GQA and KSA attention under context parallelism (CP).

Inputs are the rank's share of the sequence in a load-balanced layout of `split.py` (`split="sequence"`:
chunks r and 2cp-1-r of the sequence; `split="document"`: chunks r and 2cp-1-r of every document, which
depends on the GLOBAL cu_seqlens), megatron layout: query [n, b, Hq, D], key / value [n, b, Hkv, D] with
n = S / cp (Hq, Hkv: heads after tensor parallelism). Output [n, b, Hq, D] for the same tokens. Every
function takes the `split` the batch was split with; the layout is only ever used through the global
indices of split.py, so both splits run the same code.

cp_comm="a2a" (Ulysses, the default): one all-to-all turns the sequence shard of all heads into
the whole sequence of Hq / cp heads; the whole sequence arrives in rank-concatenated (zigzag)
order, is permuted to natural order so the unchanged single-device attention (SDPA per document,
or the KSA kernel) runs with the GLOBAL cu_seqlens, then permuted back and sent home by the
inverse all-to-all. q, k and v travel in ONE all-to-all (concatenated per destination rank).
GQA: when Hkv < cp, every KV head is replicated cp / Hkv times before the exchange so that each
rank receives whole query groups and the KV head they read (the replication's backward sums the
copies' gradients); heads that cannot be split raise a ValueError naming the numbers.

cp_comm="allgather" (dense only): K and V are all-gathered (reduce-scattered in backward) and
each rank attends with its own queries, run of contiguous positions by run (`split.cp_chunk_bounds`),
document by document, with a lower-right aligned causal mask (the run's queries end where its visible
keys end). Needs no head
divisibility and, with 4 KV heads, moves FEWER bytes than Ulysses for cp < 9 (Ulysses ships q, k, v
and the output: (2 Hq + 2 Hkv) S (cp-1)/cp^2 head-rows per rank; all-gather ships only K and V:
2 Hkv S (cp-1)/cp), at the price of holding the whole K/V per rank (README.md has the numbers).
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch.nn.attention.bias import causal_lower_right

from models.attention.dense import causal_attention, cut_padding_tail, with_padding_rows
from models.sdpa import sdpa
from parallel.context.comm import all_gather_seq, group_size_rank, head_to_seq_a2a, seq_to_head_a2a
from parallel.context.split import (CPSplit, cp_chunk_bounds, cp_global_indices, natural_to_rank_concat,
                                    rank_concat_to_natural)

__all__ = ["check_cp_heads", "expand_kv_heads_for_cp", "ulysses_attention", "dense_cp_attention",
           "ksa_cp_attention", "ksa_summary_mask_for_cp"]

CPComm = Literal["a2a", "allgather"]
AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_cp_heads(num_q_heads: int, num_kv_heads: int, cp_size: int) -> int:
    """KV heads per rank's share after replication; ValueError when Ulysses cannot split the heads.

    Ulysses gives rank j query heads [j Hq/cp, (j+1) Hq/cp); they must form whole GQA groups with
    their KV heads on the same rank: Hq % cp == 0 and either Hkv % cp == 0 (each rank gets Hkv/cp KV
    heads) or cp % Hkv == 0 (each KV head replicated cp/Hkv times, one per rank).
    """
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if num_q_heads % cp_size:
        raise ValueError(f"Ulysses context parallelism needs query heads ({num_q_heads}, after tensor parallelism) "
                         f"divisible by cp ({cp_size}); use cp_comm='allgather' or a smaller cp")
    if num_kv_heads % cp_size and cp_size % num_kv_heads:
        raise ValueError(f"KV heads ({num_kv_heads}, after tensor parallelism) and cp ({cp_size}) must divide one "
                         "another for Ulysses (KV heads are replicated when fewer than cp)")
    return max(num_kv_heads, cp_size)


def expand_kv_heads_for_cp(key: torch.Tensor, value: torch.Tensor, num_q_heads: int,
                           cp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replicate KV heads [.., Hkv, D] -> [.., cp, D] when Hkv < cp (see `check_cp_heads`)."""
    hkv = key.shape[-2]
    target = check_cp_heads(num_q_heads, hkv, cp_size)
    if target == hkv:
        return key, value
    rep = target // hkv
    return key.repeat_interleave(rep, dim=-2), value.repeat_interleave(rep, dim=-2)


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_fn: AttnFn, *,
                      cp_group: dist.ProcessGroup | None, split: CPSplit = "sequence",
                      cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Run `attn_fn` on the whole sequence for a head shard (Ulysses), return the local tokens.

    query [n, b, Hq, D], key / value [n, b, Hkv, D] (this rank's tokens in the `split` layout, which for
    "document" is defined by the GLOBAL cu_seqlens);
    attn_fn(q [S, b, Hq/cp, D], k, v [S, b, Hkv'/cp, D]) sees natural token order and returns
    [S, b, Hq/cp, D]. Returns [n, b, Hq, D].
    """
    cp, _ = group_size_rank(cp_group)
    if cp == 1:
        return attn_fn(query, key, value)
    n, b, hq, d = query.shape
    key, value = expand_kv_heads_for_cp(key, value, hq, cp)
    hk = key.shape[2]
    # one all-to-all for q, k, v: concatenate per destination rank along the head dim
    packed = torch.cat([query.reshape(n, b, cp, hq // cp, d), key.reshape(n, b, cp, hk // cp, d),
                        value.reshape(n, b, cp, hk // cp, d)], dim=3).reshape(n, b, -1, d)
    layout = dict(split=split, cu_seqlens=cu_seqlens)
    full = rank_concat_to_natural(seq_to_head_a2a(packed, cp_group), cp, dim=0, **layout)
    q, k, v = full.split([hq // cp, hk // cp, hk // cp], dim=2)
    out = attn_fn(q, k, v)
    return head_to_seq_a2a(natural_to_rank_concat(out, cp, dim=0, **layout), cp_group)


def _without_padding(attend, cu_seqlens: torch.Tensor | None, pad_tail: tuple[int, int]) -> AttnFn:
    """An AttnFn on the whole sequence ([S, b, h, d], natural order) that runs attend(q, k, v, cu_seqlens) on the
    tokens before the padding `pad_tail` names at its end (models/attention/dense.py cut_padding_tail) and gives the
    padding a zero output."""
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q.shape[0]
        n, cu = cut_padding_tail(s, cu_seqlens, pad_tail)
        return with_padding_rows(attend(q[:n], k[:n], v[:n], cu), s, 0)
    return fn


def _sdpa_sbhd(scale: float, cu_seqlens: torch.Tensor | None, dropout_p: float,
               pad_tail: tuple[int, int] = (0, 0)) -> AttnFn:
    """The whole sequence's causal attention, its tail of padding (`pad_tail`) left out and given a zero output."""
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, h, n, d]
        return causal_attention(q, k, v, cu, scale, dropout_p=dropout_p).permute(2, 0, 1, 3)
    return _without_padding(attend, cu_seqlens, pad_tail)


def _allgather_dense(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, cp_group,
                     cu_seqlens: torch.Tensor | None, scale: float, dropout_p: float,
                     split: CPSplit = "sequence", pad_tail: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Local queries against all-gathered K/V, per run of contiguous local positions and document; the documents
    of the padding `pad_tail` names at the sequence's end get a zero output, unattended."""
    cp, rank = group_size_rank(cp_group)
    n, b, hq, d = query.shape
    seq_len = n * cp
    k_all, v_all = (rank_concat_to_natural(all_gather_seq(t, cp_group, dim=0), cp, dim=0, split=split,
                                           cu_seqlens=cu_seqlens) for t in (key, value))
    q_b, k_b, v_b = (t.permute(1, 2, 0, 3) for t in (query, k_all, v_all))  # [b, h, tokens, d]
    gqa = k_b.shape[1] != hq
    bounds = [0, seq_len] if cu_seqlens is None else cu_seqlens.tolist()
    if cu_seqlens is not None and b != 1:
        raise ValueError("packed sequences (cu_seqlens) need micro batch size 1")
    kept = len(cut_padding_tail(seq_len, cu_seqlens, pad_tail)[1] if cu_seqlens is not None else bounds) - 1
    pieces, local0 = [], 0
    for a, e in cp_chunk_bounds(seq_len, cp, rank, split=split, cu_seqlens=cu_seqlens):
        i = bisect_right(bounds, a) - 1  # the document holding position a
        while i < len(bounds) - 1 and bounds[i] < e:
            ds, de = bounds[i], bounds[i + 1]
            i += 1
            lo, hi = max(a, ds), min(e, de)
            if hi <= lo:
                continue
            qs = q_b[:, :, local0 + lo - a: local0 + hi - a]
            if i > kept:  # a padding segment at the end
                pieces.append(qs.new_zeros(qs.shape))
                continue
            ks, vs = k_b[:, :, ds:hi], v_b[:, :, ds:hi]
            pieces.append(sdpa(
                qs, ks, vs, attn_mask=causal_lower_right(hi - lo, hi - ds), dropout_p=dropout_p, scale=scale,
                enable_gqa=gqa))
        local0 += e - a
    return torch.cat(pieces, dim=2).permute(2, 0, 1, 3)


def dense_cp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                       cp_group: dist.ProcessGroup | None, scale: float,
                       cu_seqlens: torch.Tensor | None = None, dropout_p: float = 0.0,
                       cp_comm: CPComm = "a2a", split: CPSplit = "sequence",
                       pad_tail: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Causal GQA attention of this rank's tokens over the whole (packed) sequence; the padding `pad_tail` names at
    its end ((tokens, segments), models/attention/dense.py padding_tail) is not attended, its output 0.

    query [n, b, Hq, D], key / value [n, b, Hkv, D] in the load-balanced `split`; cu_seqlens: the
    GLOBAL document boundaries (int32 [docs + 1], batch 1). Returns [n, b, Hq, D].
    """
    if cp_comm == "a2a":
        return ulysses_attention(query, key, value, _sdpa_sbhd(scale, cu_seqlens, dropout_p, pad_tail),
                                 cp_group=cp_group, split=split, cu_seqlens=cu_seqlens)
    if cp_comm == "allgather":
        return _allgather_dense(query, key, value, cp_group=cp_group, cu_seqlens=cu_seqlens, scale=scale,
                                dropout_p=dropout_p, split=split, pad_tail=pad_tail)
    raise ValueError(f"cp_comm must be 'a2a' or 'allgather', got {cp_comm!r}")


def ksa_cp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                     cp_group: dist.ProcessGroup | None, chunk: int, window: int, num_summary: int = 1,
                     cu_seqlens: torch.Tensor | None = None, scale: float | None = None,
                     backend: str = "auto", split: CPSplit = "sequence",
                     pad_tail: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """KSA under CP by Ulysses: each rank runs the unchanged KSA kernel on the whole interleaved
    sequence (text AND summary tokens) for Hq / cp heads; the padding `pad_tail` names at its end
    (models/attention/dense.py padding_tail) is left out, its output 0.

    The split must be of the INTERLEAVED sequence (after models/ksa_tokens.insert_summary_slots), so
    S counts summary slots and cu_seqlens are the interleaved boundaries; the summary / text role of
    a local token comes from its global position (`ksa_summary_mask_for_cp`), not its local index.
    """
    from kernels.ksa import ksa_attention

    if backend == "auto":  # the Triton kernel on a GPU, the mask reference elsewhere (as KSACoreAttention)
        backend = "triton" if query.is_cuda else "naive"

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (t.transpose(0, 1).contiguous() for t in (q, k, v))  # [b, n, h, d]
        out = ksa_attention(q, k, v, chunk=chunk, window=window, num_summary=num_summary, cu_seqlens=cu,
                            scale=scale, backend=backend)
        return out.transpose(0, 1)
    return ulysses_attention(query, key, value, _without_padding(attend, cu_seqlens, pad_tail), cp_group=cp_group,
                             split=split, cu_seqlens=cu_seqlens)


def ksa_summary_mask_for_cp(seq_len: int, batch: int, *, chunk: int, num_summary: int,
                            cu_seqlens: torch.Tensor | None, cp_size: int, cp_rank: int,
                            device: torch.device | str | None = None, split: CPSplit = "sequence") -> torch.Tensor:
    """[n, b] bool: which of this rank's tokens are summary slots (KSASelfAttention's projection
    switch), computed from GLOBAL positions: seq_len is the global interleaved length."""
    pos = cp_global_indices(seq_len, cp_size, cp_rank, device, split=split, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        pos = pos - cu[torch.searchsorted(cu[1:], pos, right=True)]
    return ((pos % (chunk + num_summary)) >= chunk)[:, None].expand(-1, batch)
