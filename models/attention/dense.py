"""Dense causal GQA core attention on torch's scaled_dot_product_attention.

Drop-in for megatron-core's `core_attention` slot (same constructor and forward signature as its
`DotProductAttention`), without materialising the [b, heads, s, s] score tensor on GPU (SDPA picks
the flash / memory-efficient kernels there; every call goes through models/sdpa.py, whose backward gets a
contiguous gradient). Packed sequences (`PackedSeqParams` with cu_seqlens) are attended per document, so no
token attends across a document boundary: one SDPA call per document, or on a GPU one varlen call when the
documents are short (`causal_attention`). The padding the trainer names at a row's end is not attended: its output
is 0 (`documents_part`, which the DSA and KSA core attentions and the chunked loss use too).

Shapes (megatron layout): query [s, b, nq, d], key/value [s, b, nkv, d] -> context [s, b, nq*d].

Context parallelism: when the CP group of `pg_collection` has more than one rank, `s` is this rank's
share of the sequence and the attention runs through the injected CP functions (`cp_ops.dense`, see
models/attention/cp.py: train/ passes parallel/context's implementation through the spec) with the GLOBAL
cu_seqlens; `cp_comm_type` (megatron's TransformerConfig.cp_comm_type, handed to every core attention)
picks Ulysses ("a2a", the default) or the all-gathered KV ("all_gather").
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from megatron.core.transformer.module import MegatronModule

from models.attention.cp import ContextParallelOps, cp_ops_for, resolve_cp_comm
from models.sdpa import sdpa


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, cp_ops: ContextParallelOps | None = None):
        super().__init__(config=config)
        self.cp_group, self.cp_ops = cp_ops_for(config, pg_collection, cp_ops)
        tp = config.tensor_model_parallel_size
        self.cp_comm = resolve_cp_comm(cp_comm_type, num_q_heads=config.num_attention_heads // tp,
                                       num_kv_heads=config.num_query_groups // tp,
                                       cp_size=config.context_parallel_size, cp_ops=self.cp_ops)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention takes no attention bias")
        s, b, nq, d = query.shape
        p = self.dropout_p if self.training else 0.0
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        if self.cp_group is not None:  # s = this rank's tokens; cu_seqlens are the global boundaries
            out = self.cp_ops.dense(query, key, value, cp_group=self.cp_group, scale=self.softmax_scale,
                                    cu_seqlens=cu, dropout_p=p, cp_comm=self.cp_comm,
                                    pad_tail=padding_tail(packed_seq_params))
            return out.reshape(s, b, nq * d)
        n, cu = documents_part(s, packed_seq_params)  # the row without its trailing padding
        # [s, b, h, d] -> [b, h, n, d]
        q, k, v = (t[:n].permute(1, 2, 0, 3) for t in (query, key, value))
        out = causal_attention(q, k, v, cu, self.softmax_scale, dropout_p=p,
                               max_seqlen=None if cu is None else longest_document(s, packed_seq_params))
        return with_padding_rows(out.permute(2, 0, 1, 3), s, 0).reshape(s, b, nq * d)


def longest_document(s: int, packed_seq_params) -> int:
    """Tokens in the longest document of a micro-batch row of s tokens: the packed parameters' Python-int
    max_seqlen_q when given (the trainer sets it, the longest segment before a trailing padding it names; no device
    sync), else read from cu_seqlens."""
    if packed_seq_params is None:
        return s
    longest = packed_seq_params.max_seqlen_q
    return longest if isinstance(longest, int) else _longest(packed_seq_params.cu_seqlens_q)


def documents_part(s: int, packed_seq_params) -> tuple[int, torch.Tensor | None]:
    """(n, cu_seqlens): the first n of a row's s tokens, before its trailing padding, and the bounds of their
    segments. The trainer names the padding at the row's end (`pad_tail` tokens in `pad_tail_segments` segments of
    models/moe/router.py PackedSeqDocuments, Python ints): a video pack's padding segment, a KSA row's padding to
    the model's length. No document attends to it and no loss reads its outputs, so a core attention runs on the n
    tokens alone and gives the padding a zero output (`with_padding_rows`): its (s - n)^2 / 2 pairs go uncomputed.
    (s, the row's cu_seqlens) when nothing is named, or when the whole row is padding (attended as before, so every
    projection still gets a gradient)."""
    cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
    return cut_padding_tail(s, cu, padding_tail(packed_seq_params))


def padding_tail(packed_seq_params) -> tuple[int, int]:
    """(tokens, segments) of the padding the trainer names at a packed row's end; (0, 0) for none. Under context
    parallelism they count the whole row (the context-parallel functions take them: models/attention/cp.py)."""
    return getattr(packed_seq_params, "pad_tail", 0), getattr(packed_seq_params, "pad_tail_segments", 0)


def local_documents(s: int, packed_seq_params, context_parallel: bool) -> int:
    """The first n of the s tokens this rank holds, before the padding that ends them: under context parallelism its
    share of the row's trailing padding (PackedSeqDocuments.pad_tail_local, which the CP split sets: a rank holds
    its tokens in the row's order; none left out where it is not set), else the row's own (pad_tail,
    documents_part's n). s when none is named or all s tokens would be padding."""
    if context_parallel:
        tail = getattr(packed_seq_params, "pad_tail_local", None) or 0
    else:
        tail = padding_tail(packed_seq_params)[0]
    return s - tail if 0 < tail < s else s


def cut_padding_tail(s: int, cu: torch.Tensor | None, tail: tuple[int, int]) -> tuple[int, torch.Tensor | None]:
    """documents_part's cut of a row of s tokens whose bounds are `cu`, given its padding_tail."""
    tokens, segments = tail
    if cu is None or not tokens or tokens >= s:
        return s, cu
    if not 0 < segments < cu.numel() - 1:
        raise ValueError(f"the row's padding takes {segments} of its {cu.numel() - 1} segments: it needs at least "
                         "one and leaves at least one")
    return s - tokens, cu[: cu.numel() - segments]


def with_padding_rows(out: torch.Tensor, s: int, dim: int) -> torch.Tensor:
    """out, the attention of a row's first n tokens (documents_part), with zero rows for its s - n padding tokens
    along `dim`."""
    n = out.shape[dim]
    if n == s:
        return out
    shape = list(out.shape)
    shape[dim] = s - n
    return torch.cat([out, out.new_zeros(shape)], dim=dim)


def _longest(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def causal_attention(q, k, v, cu_seqlens, scale: float, dropout_p: float = 0.0, max_seqlen: int | None = None):
    """Causal GQA attention on [b, h, s, d] tensors; with cu_seqlens (batch 1), per document.

    Packed rows of short documents on a GPU go through one FlashAttention varlen call over the document
    bounds when torch has it (bf16 / fp16, no dropout; VARLEN_BELOW_MEAN_DOC); max_seqlen, the longest
    document, saves reading it from cu_seqlens. Otherwise one SDPA call per document."""
    if cu_seqlens is None:
        return sdpa(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if q.shape[0] != 1:
        raise ValueError("packed sequences (cu_seqlens) need micro batch size 1")
    if (q.is_cuda and dropout_p == 0.0 and q.dtype in (torch.bfloat16, torch.float16) and _varlen() is not None
            and q.shape[2] < VARLEN_BELOW_MEAN_DOC * (cu_seqlens.numel() - 1)):
        return _varlen_causal(q, k, v, cu_seqlens, scale, max_seqlen)
    return per_document_attention(q, k, v, cu_seqlens, scale, dropout_p)


# One varlen call beats one SDPA call per document when documents average fewer tokens than this (H200,
# bf16, 32 q / 4 kv heads, head dim 128, forward+backward; bench/bench_packed_attention.py): the loop's
# per-call cost dominates short documents, and torch's varlen kernel (FlashAttention 2, K / V repeated for
# GQA in torch 2.11) is slower than SDPA's own kernels on long ones.
VARLEN_BELOW_MEAN_DOC = 1024


def per_document_attention(q, k, v, cu_seqlens, scale: float, dropout_p: float = 0.0):
    """causal_attention of a packed row [1, h, s, d], one SDPA call per document of cu_seqlens.

    The row is split into documents and the outputs concatenated, so the backward joins the documents'
    input gradients once (a cat). Slicing each document out of the row and writing into a preallocated
    output instead took 146 against 26 ms of forward+backward at 128K tokens of 2,048-token documents on an
    H200 (bench/bench_packed_attention.py; the likely cause, not measured apart: each slice's backward
    makes a gradient of the whole row)."""
    gqa = k.shape[1] != q.shape[1]
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[2]:
        raise ValueError(f"cu_seqlens must run from 0 to the row's {q.shape[2]} tokens, got {bounds[0]} .. "
                         f"{bounds[-1]}")
    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    outs = []
    for qd, kd, vd in zip(*(torch.split(t, sizes, dim=2) for t in (q, k, v))):
        outs.append(qd if qd.shape[2] == 0 else sdpa(qd, kd, vd, is_causal=True, dropout_p=dropout_p,
                                                     scale=scale, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


@functools.cache
def _varlen():
    """(varlen_attn, its parameter names) of the installed torch, or None (no varlen, or a signature this
    module cannot make causal)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = frozenset(inspect.signature(varlen_attn).parameters)
    return (varlen_attn, params) if {"window_size", "is_causal"} & params else None


def _varlen_causal(q, k, v, cu_seqlens, scale: float, max_seqlen: int | None):
    """[1, h, s, d] -> [1, hq, s, d]: one causal varlen call over the documents of cu_seqlens."""
    fn, params = _varlen()
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    if max_seqlen is None:
        max_seqlen = _longest(cu_seqlens)
    q_, k_, v_ = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # [s, h, d]
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kw["scale"] = scale
    elif scale != d ** -0.5:
        q_ = q_ * (scale * d ** 0.5)
    if hkv != hq:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k_, v_ = (t.repeat_interleave(hq // hkv, dim=1) for t in (k_, v_))
    cu = cu_seqlens.to(torch.int32)
    out = fn(q_, k_, v_, cu, cu, max_seqlen, max_seqlen, **kw)
    return out.transpose(0, 1).unsqueeze(0)
