"""DeepSeek Sparse Attention for GQA (DSA) under context parallelism (CP).

Each rank holds n = S / cp tokens of a load-balanced split (`split.py`: chunks r and 2cp-1-r of the
sequence, or of every document with `split="document"`); all that is used of the layout is the global
position of each local token and the rank-concatenated order of a gather. Per layer:

1. all-gather the shared 64-dim index keys k_idx (2 bytes x 64 per token in bf16, tiny) and restore
   natural order; backward: reduce-scatter of dk_idx (every rank's indexer loss reaches every key);
2. top-k for the rank's OWN queries against ALL keys: eligible keys are s <= t (t = the query's
   GLOBAL position) inside t's document (global cu_seqlens); indices are global key positions,
   sorted ascending, -1 padded -- exactly what the single-device selector returns for those rows
   (same scores, same tie rule); never an S x S tensor (rows are processed in chunks);
3. all-gather the GQA K / V (Hkv = 4 heads after TP: small next to the queries), reduce-scatter
   dK / dV in backward, and run the sparse attention for the local queries with global indices;
4. the indexer KL loss for the local queries: sparse stage over the selected set with the sparse
   attention's lse, dense warm-up over all eligible keys with the dense lse; the returned value is
   the MEAN over this rank's tokens, so `kl * b * n` is the rank's share of the global token sum
   (what DSACoreAttention attaches with the local s; the CP gradient all-reduce adds the shares).

Dense warm-up attention itself is the Ulysses dense attention of `attention.py`.

Query subsets and the kernels (kernels/dsa): causality lives only in `idx`, so the Triton sparse
attention and sparse KL kernels accept queries that are a subset of positions when the batch is
folded into one row (B = 1: query rows are local, key rows global). The top-k selector and the
dense-stage KL kernels derive the causal bound from the query's ROW index; for them the local
queries are scattered into a zero buffer at their global rows and the kernels are launched only on
the blocks holding local rows, with the document start of other rows set past the row (empty key
range). That costs transient buffers of (last local position + 1) rows -- see README.md -- until the
kernels take query positions. The "naive" backend here is a row-chunked PyTorch reference for
query subsets (float64 scores, the same ranking as kernels/dsa/naive.py).

Shapes (suffixes): query [n, b, Hq, D], key / value [n, b, Hkv, D] (megatron layout), indexer
q_idx [b, n, HI, DI], w [b, n, HI], k_idx [b, n, DI] (DSAIndexer's layout). Internally the batch is
folded into one packed row: R = b * n query rows, T = b * S key rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from kernels.dsa import naive as dsa_naive
from kernels.dsa.common import check_triton_device
from models.attention.dense import with_padding_rows
from parallel.context.attention import CPComm, dense_cp_attention
from parallel.context.comm import all_gather_seq, group_size_rank
from parallel.context.split import CPSplit, cp_global_indices, rank_concat_to_natural

__all__ = ["DSACPOutput", "dsa_cp_attention", "cp_topk_indices", "gather_index_keys"]

Stage = Literal["dense", "sparse"]
Backend = Literal["auto", "naive", "triton"]


@dataclass
class DSACPOutput:
    out: torch.Tensor               # [n, b, Hq, D] attention output of the local tokens
    kl: torch.Tensor | None         # scalar: mean indexer KL over the local tokens (grad into the indexer only); None
    #                                 when with_kl=False
    idx: torch.Tensor | None        # [b, n, K] int32 global key positions (per batch row), -1 padded; None if dense


# ---------------------------------------------------------------------------------------------- helpers
def _doc_start(pos: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    cu = cu.to(device=pos.device, dtype=torch.long)
    return cu[torch.searchsorted(cu[1:], pos, right=True)]


def _fold(seq_len: int, batch: int, cp: int, rank: int, cu_seqlens: torch.Tensor | None,
          device, split: CPSplit = "sequence") -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the local queries after folding the batch into one packed row (batch row i becomes a
    document at offset i * seq_len) and their document starts: [b * n] int64 each."""
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError("packed sequences (cu_seqlens) need micro batch size 1")
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        if int(cu[-1]) != seq_len:
            raise ValueError(f"cu_seqlens must be the GLOBAL boundaries (last entry {seq_len}), got {int(cu[-1])}")
    else:
        cu = torch.arange(batch + 1, device=device) * seq_len
    pos = cp_global_indices(seq_len, cp, rank, device, split=split, cu_seqlens=cu_seqlens)
    pos_f = (torch.arange(batch, device=device)[:, None] * seq_len + pos[None, :]).reshape(-1)
    return pos_f, _doc_start(pos_f, cu)


def gather_index_keys(x: torch.Tensor, cp_group: dist.ProcessGroup | None, *, dim: int,
                      split: CPSplit = "sequence", cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """All-gather a per-token tensor over CP and restore natural token order (reduce-scatter backward)."""
    cp, _ = group_size_rank(cp_group)
    if cp == 1:
        return x
    return rank_concat_to_natural(all_gather_seq(x, cp_group, dim=dim), cp, dim=dim, split=split,
                                  cu_seqlens=cu_seqlens)


# ---------------------------------------------------------------------------- reference (query subsets)
def _topk_ref(q_idx_RHD, w_RH, k_idx_TD, pos_R, start_R, topk: int, rows_per_chunk: int = 256) -> torch.Tensor:
    """[R, K] int32 for arbitrary query rows (global positions pos_R): the ranking of
    kernels/dsa/naive.topk_indices (float64 scores, naive.rank_topk)."""
    T = k_idx_TD.shape[0]
    s = torch.arange(T, device=k_idx_TD.device)
    out = []
    for r0 in range(0, pos_R.numel(), rows_per_chunk):
        sl = slice(r0, r0 + rows_per_chunk)
        scores = dsa_naive.index_scores(q_idx_RHD[None, sl], w_RH[None, sl], k_idx_TD[None])[0]  # [r, T] f64
        elig = (s[None] <= pos_R[sl, None]) & (s[None] >= start_R[sl, None])
        out.append(dsa_naive.rank_topk(scores, elig, topk))
    return torch.cat(out)


def _sparse_attn_ref(q_RHD, k_THD, v_THD, idx_RK, scale: float):
    """Gather-based sparse GQA attention (float64 math). Returns o [R, Hq, D], lse [R, Hq] fp32."""
    R, Hq, D = q_RHD.shape
    Hkv = k_THD.shape[1]
    valid = idx_RK >= 0
    ii = idx_RK.clamp_min(0).long()
    kg, vg = k_THD[ii].double(), v_THD[ii].double()                       # [R, K, Hkv, D]
    logits = torch.einsum("rhgd,rkhd->rhgk", q_RHD.view(R, Hkv, Hq // Hkv, D).double(), kg) * scale
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse[..., None]).nan_to_num(0.0)
    o = torch.einsum("rhgk,rkhd->rhgd", p, vg).reshape(R, Hq, D)
    return o.to(q_RHD.dtype), lse.reshape(R, Hq).float()


def _kl_rows_ref(q_RHD, k_THD, q_idx_RHD, w_RH, k_idx_TD, keys_mask_RT, lse_RH, scale: float) -> torch.Tensor:
    """Sum over rows of KL(p || softmax(I)) on the key set mask [r, T] (float64; grads into the indexer).
    lse None: the dense lse over the mask."""
    R, Hq, D = q_RHD.shape
    Hkv = k_THD.shape[1]
    k_rep = k_THD.repeat_interleave(Hq // Hkv, dim=1).double()
    logits = torch.einsum("rhd,thd->rht", q_RHD.double(), k_rep) * scale
    logits = logits.masked_fill(~keys_mask_RT[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1) if lse_RH is None else lse_RH.double()
    P = torch.where(keys_mask_RT[:, None, :], torch.exp(logits - lse[..., None]), torch.zeros_like(logits)).sum(1)
    p = P / P.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    scores = dsa_naive.index_scores(q_idx_RHD[None], w_RH[None], k_idx_TD[None])[0]
    return dsa_naive.masked_kl(p, scores, keys_mask_RT).sum()


def _kl_ref(stage: Stage, q, k, q_idx, w, k_idx, pos, start, idx, lse, scale: float,
            rows_per_chunk: int = 128) -> torch.Tensor:
    T = k.shape[0]
    s = torch.arange(T, device=k.device)
    total = q_idx.new_zeros((), dtype=torch.float64)
    for r0 in range(0, pos.numel(), rows_per_chunk):
        sl = slice(r0, r0 + rows_per_chunk)
        if stage == "dense":
            mask = (s[None] <= pos[sl, None]) & (s[None] >= start[sl, None])
            lse_c = None
        else:
            mask = dsa_naive.selection_mask(idx[None, sl], T)[0]
            lse_c = lse[sl]
        total = total + _kl_rows_ref(q[sl], k, q_idx[sl], w[sl], k_idx, mask, lse_c, scale)
    return (total / pos.numel()).float()


# ------------------------------------------------------------------------------ Triton (query subsets)
def _scatter_rows(x_R: torch.Tensor, pos_R: torch.Tensor, rows: int) -> torch.Tensor:
    """[R, ...] -> [rows, ...] zeros with x at rows pos (differentiable in x)."""
    return x_R.new_zeros((rows, *x_R.shape[1:])).index_copy(0, pos_R, x_R)


def _padded_starts(pos_R: torch.Tensor, start_R: torch.Tensor, rows: int) -> torch.Tensor:
    """int32 [rows]: document start of local rows; row + 1 (an empty key range) for the others."""
    st = torch.arange(1, rows + 1, device=pos_R.device, dtype=torch.long)
    st[pos_R] = start_R
    return st.to(torch.int32)


def _runs(pos_R: torch.Tensor) -> list[tuple[int, int]]:
    """The local rows as ascending [lo, hi) runs of consecutive positions (one host sync): two per
    document (or per sequence) and rank under the load-balanced split."""
    p = torch.sort(pos_R).values
    cut = torch.nonzero(p[1:] != p[:-1] + 1).flatten()
    ends = torch.cat([p[cut] + 1, p[-1:] + 1])
    starts = torch.cat([p[:1], p[cut + 1]])
    return list(zip(*torch.stack([starts, ends]).tolist()))


def _topk_triton(q_idx_RHD, w_RH, k_idx_TD, pos_R, start_R, topk: int, chunk_bytes: int | None = None) -> torch.Tensor:
    """Top-k of the local rows with the kernels/dsa Triton selector, launched only on the blocks that
    hold local rows (queries scattered to their global rows, see the module docstring)."""
    from kernels.dsa.topk import TOPK_CHUNK_BYTES, _config, default_cap, topk_blocks
    chunk_bytes = TOPK_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    dev = q_idx_RHD.device
    Tp = int(pos_R.max()) + 1
    K = int(topk)
    q_idx = _scatter_rows(q_idx_RHD.detach(), pos_R, Tp)[None].contiguous()
    w = _scatter_rows(w_RH.detach(), pos_R, Tp)[None].contiguous()
    k_idx = k_idx_TD.detach()[None, :Tp].contiguous()
    start = _padded_starts(pos_R, start_R, Tp)
    cap = default_cap(K)
    out = torch.full((1, Tp, K), -1, dtype=torch.int32, device=dev)
    blocks = torch.unique(pos_R // _config(dev)["BT"]).to(torch.int32)
    topk_blocks(q_idx, w, k_idx, start, blocks, Tp, K, cap, min(2048, cap // 2), out, chunk_bytes)
    return out[0, pos_R]


def _dense_kl_triton(q_RHD, k_THD, q_idx_RHD, w_RH, k_idx_TD, pos_R, start_R, scale: float,
                     grad: float | None = None) -> torch.Tensor:
    """Dense-stage KL of the local rows (mean over them) with the kernels/dsa Triton kernels: rows
    scattered to their global positions; rows not held have an empty key range and contribute 0.
    grad: back-propagate at once with d(total)/d(KL) = grad (the KL is returned detached), as
    kernels.dsa.indexer_kl_loss_backward_now does."""
    from kernels.dsa.indexer_loss_dense import indexer_kl_dense
    runs = _runs(pos_R)
    Tp = runs[-1][1]
    R = pos_R.numel()
    q = _scatter_rows(q_RHD.detach(), pos_R, Tp)[None].contiguous()
    k = k_THD.detach()[None, :Tp].contiguous()
    q_idx = _scatter_rows(q_idx_RHD, pos_R, Tp)[None]
    w = _scatter_rows(w_RH, pos_R, Tp)[None]
    start = _padded_starts(pos_R, start_R, Tp)
    # the kernels' mean is over Tp rows: the local mean is Tp / R times it, and so is its gradient
    mean_tp = indexer_kl_dense(q_idx, w, k_idx_TD[None, :Tp], q, k, start, scale,
                               grad=None if grad is None else grad * Tp / R, rows=runs)
    return mean_tp * (Tp / R)


def _sparse_triton(q_RHD, k_THD, v_THD, q_idx_RHD, w_RH, k_idx_TD, idx_RK, scale: float,
                   span: int | None = None, with_kl: bool = True, kl_in_backward: float | None = None):
    """Sparse attention + sparse KL for local rows: the kernels index keys by idx only (B = 1).
    kl_in_backward: the KL rides on the output with this weight and its target comes from the attention
    backward (kernels/dsa/fused.py); the KL is returned detached and filled by that backward.

    span: the widest key range a local row reaches (its position minus its document start, plus
    one; None: sparse_attn_bwd takes the key rows' count). The attention backward's launch settings depend on it
    (kernels/dsa/sparse_attn._config), and neither the local row count nor the gathered key count
    is it: 64K local rows of a 128K sequence reach 128K keys."""
    from kernels.dsa import build_sparse_plan, default_block_q
    from kernels.dsa.indexer_loss import IndexerKLLossFn, loss_block_q
    from kernels.dsa.sparse_attn import SparseGQAAttentionFn
    Hq, Hkv, HI = q_RHD.shape[1], k_THD.shape[1], q_idx_RHD.shape[1]
    idx = idx_RK[None].contiguous()
    # idx holds global key positions: the plan's bitmaps span the gathered keys, not the local rows
    n_keys = k_THD.shape[0]
    plan = build_sparse_plan(idx, default_block_q(Hq, Hkv), n_keys=n_keys, max_doc_len=span)
    q, k, v = q_RHD[None].contiguous(), k_THD[None].contiguous(), v_THD[None].contiguous()
    bq = loss_block_q(Hq, Hkv, HI)
    if with_kl and kl_in_backward is not None and bq == plan.block_q:
        from kernels.dsa.fused import SparseAttentionKLFn
        kl = torch.full((), float("nan"), dtype=torch.float32, device=q.device)
        o = SparseAttentionKLFn.apply(q, k, v, q_idx_RHD[None], w_RH[None], k_idx_TD[None], plan, scale,
                                      float(kl_in_backward), kl)
        return o[0], kl
    o, lse = SparseGQAAttentionFn.apply(q, k, v, plan, scale)
    if not with_kl:
        return o[0], None
    lplan = plan if bq == plan.block_q else build_sparse_plan(idx, bq, n_keys=n_keys,
                                                              max_doc_len=plan.max_doc_len)
    kl = IndexerKLLossFn.apply(q_idx_RHD[None], w_RH[None], k_idx_TD[None], q.detach(), k.detach(),
                               lse.detach(), lplan, scale)
    return o[0], kl


# ------------------------------------------------------------------------------------------- public API
def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    """"auto": the Triton kernels on a GPU, the PyTorch reference elsewhere (as DSACoreAttention)."""
    if backend == "auto":
        return "triton" if x.is_cuda else "naive"
    if backend not in ("naive", "triton"):
        raise ValueError(f"backend must be 'auto', 'naive' or 'triton', got {backend!r}")
    if backend == "triton":
        check_triton_device(x)
    return backend


def cp_topk_indices(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, *, topk: int,
                    cp_group: dist.ProcessGroup | None, cu_seqlens: torch.Tensor | None = None,
                    backend: Backend = "auto", split: CPSplit = "sequence") -> torch.Tensor:
    """[b, n, K] int32: the single-device top-k rows of this rank's queries (global key positions).

    q_idx [b, n, HI, DI], w [b, n, HI], k_idx [b, n, DI] are the local indexer outputs; the index
    keys are all-gathered here. No gradient.
    """
    backend = _resolve_backend(backend, q_idx)
    cp, rank = group_size_rank(cp_group)
    b, n = q_idx.shape[:2]
    S = n * cp
    with torch.no_grad():
        k_all = gather_index_keys(k_idx.detach(), cp_group, dim=1, split=split,
                                  cu_seqlens=cu_seqlens).reshape(b * S, -1)
        pos, start = _fold(S, b, cp, rank, cu_seqlens, q_idx.device, split)
        idx = _select(q_idx.reshape(b * n, *q_idx.shape[2:]), w.reshape(b * n, -1), k_all, pos, start, topk,
                      backend)
        return _unfold_idx(idx, b, n, S)


def _select(q_idx_R, w_R, k_all_T, pos, start, topk: int, backend: Backend) -> torch.Tensor:
    """[R, K] int32 folded global positions (no gradient)."""
    fn = _topk_ref if backend == "naive" else _topk_triton
    return fn(q_idx_R, w_R, k_all_T, pos, start, topk)


def _unfold_idx(idx_RK: torch.Tensor, b: int, n: int, S: int) -> torch.Tensor:
    off = (torch.arange(b, device=idx_RK.device) * S).repeat_interleave(n)[:, None].to(idx_RK.dtype)
    return torch.where(idx_RK >= 0, idx_RK - off, idx_RK).view(b, n, -1)


def dsa_cp_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_idx: torch.Tensor,
                     w: torch.Tensor, k_idx: torch.Tensor, *, cp_group: dist.ProcessGroup | None, topk: int,
                     stage: Stage, scale: float, cu_seqlens: torch.Tensor | None = None,
                     backend: Backend = "auto", dense_cp_comm: CPComm = "a2a",
                     split: CPSplit = "sequence", kl_grad: float | None = None,
                     with_kl: bool = True, kl_in_backward: float | None = None,
                     pad_tail: tuple[int, int] = (0, 0), local_tail: int = 0) -> DSACPOutput:
    """DSA of this rank's tokens under CP (see the module docstring).

    query [n, b, Hq, D], key / value [n, b, Hkv, D]; q_idx [b, n, HI, DI], w [b, n, HI], k_idx [b, n, DI];
    cu_seqlens: GLOBAL boundaries (batch 1); split: the layout of the local tokens. stage "sparse": top-k + sparse attention + sparse KL;
    stage "dense": dense attention (`dense_cp_attention` with `dense_cp_comm`) + dense KL (warm-up). Returns out [n, b, Hq, D], the local
    mean KL and (sparse) the selected global positions [b, n, K].
    kl_grad: the caller's d(total)/d(KL) when it back-propagates the KL in its forward (models/attention/dsa.py,
    kl_backward="local"). The dense stage's Triton path then back-propagates it here and returns the KL
    detached; every other path returns it with its graph, as without
    kl_grad, for the caller's own backward.
    with_kl=False: no KL (kl None) and none of the gathers only it needs; every rank of the group must pass the
    same (the callers derive it from the grad mode, the same on every rank of a step).
    kl_in_backward: the caller's d(total)/d(KL) for a KL that rides on the output (the sparse stage with
    autograd). The sparse stage's Triton path then trains the indexer in the output's backward, which also
    computes the KL's target (kernels/dsa/fused.py), and returns the KL detached, filled by that backward;
    every other path returns it with its graph, for the caller to attach.
    pad_tail: (tokens, segments) of padding at the row's end (models/attention/dense.py padding_tail; packed rows),
    which the dense stage's attention leaves out. local_tail: how many of this rank's tokens, at the end of its
    share, lie in it (`split.cp_local_tail`, which the trainer's CP split gives as PackedSeqDocuments.pad_tail_local;
    the caller weighs the KL by the rest): they select no keys, their output is 0, their idx rows -1, and the KL and
    its mean are over the rank's other tokens.
    """
    if stage not in ("dense", "sparse"):
        raise ValueError(f"stage must be 'dense' or 'sparse', got {stage!r}")
    backend = _resolve_backend(backend, query)
    cp, rank = group_size_rank(cp_group)
    n, b, Hq, D = query.shape
    Hkv = key.shape[2]
    S = n * cp
    pos, start = _fold(S, b, cp, rank, cu_seqlens, query.device, split)
    layout = dict(split=split, cu_seqlens=cu_seqlens)
    R = b * n
    if local_tail and not (cu_seqlens is not None and 0 < local_tail < R):
        raise ValueError(f"local_tail={local_tail}: a packed row's padding must leave some of the rank's {R} tokens")
    m = R - local_tail   # the rows before this rank's share of the row's trailing padding (batch 1 when packed)
    pos, start = pos[:m], start[:m]
    q_idx_R, w_R = q_idx.reshape(R, *q_idx.shape[2:])[:m], w.reshape(R, -1)[:m]
    q_R = query.transpose(0, 1).reshape(R, Hq, D)[:m]
    if stage == "dense":
        out = dense_cp_attention(query, key, value, cp_group=cp_group, scale=scale, cu_seqlens=cu_seqlens,
                                 cp_comm=dense_cp_comm, split=split, pad_tail=pad_tail)
        if not with_kl:
            return DSACPOutput(out=out, kl=None, idx=None)
        k_idx_T = gather_index_keys(k_idx, cp_group, dim=1, **layout).reshape(b * S, -1)   # grads reduce-scattered
        k_T = gather_index_keys(key.detach(), cp_group, dim=0, **layout).transpose(0, 1).reshape(b * S, Hkv, D)
        if backend == "naive":
            kl = _kl_ref("dense", q_R.detach(), k_T, q_idx_R, w_R, k_idx_T, pos, start, None, None, scale)
        else:
            kl = _dense_kl_triton(q_R, k_T, q_idx_R, w_R, k_idx_T, pos, start, scale,
                                  kl_grad if torch.is_grad_enabled() else None)
        return DSACPOutput(out=out, kl=kl, idx=None)
    k_idx_T = gather_index_keys(k_idx, cp_group, dim=1, **layout).reshape(b * S, -1)   # grads reduce-scattered
    with torch.no_grad():
        idx = _select(q_idx_R.detach(), w_R.detach(), k_idx_T.detach(), pos, start, topk, backend)
    k_T, v_T = (gather_index_keys(t, cp_group, dim=0, **layout).transpose(0, 1).reshape(b * S, Hkv, D)
                for t in (key, value))
    if backend == "naive":
        o_R, lse = _sparse_attn_ref(q_R, k_T, v_T, idx, scale)
        kl = _kl_ref("sparse", q_R.detach(), k_T.detach(), q_idx_R, w_R, k_idx_T, pos, start, idx, lse.detach(),
                     scale) if with_kl else None
    else:
        span = int((pos - start).max()) + 1  # one host sync, like the top-k's
        o_R, kl = _sparse_triton(q_R, k_T, v_T, q_idx_R, w_R, k_idx_T, idx, scale, span, with_kl,
                                 kl_in_backward if torch.is_grad_enabled() else None)
    out = with_padding_rows(o_R, R, 0).view(b, n, Hq, D).transpose(0, 1)
    idx = torch.cat([idx, idx.new_full((R - m, idx.shape[1]), -1)]) if m < R else idx
    return DSACPOutput(out=out, kl=kl, idx=_unfold_idx(idx, b, n, S))
