"""Dense causal GQA core attention on torch's scaled_dot_product_attention.

Drop-in for megatron-core's `core_attention` slot (same constructor and forward signature as its
`DotProductAttention`), without materialising the [b, heads, s, s] score tensor on GPU (SDPA picks
the flash / memory-efficient kernels there). Packed sequences (`PackedSeqParams` with cu_seqlens)
are attended document by document, so no token attends across a document boundary.

Shapes (megatron layout): query [s, b, nq, d], key/value [s, b, nkv, d] -> context [s, b, nq*d].

Context parallelism: when the CP group of `pg_collection` has more than one rank, `s` is this rank's
share of the sequence and the attention runs through the injected CP functions (`cp_ops.dense`, see
models/attention/cp.py: train/ passes parallel/context's implementation through the spec) with the GLOBAL
cu_seqlens; `cp_comm_type` (megatron's TransformerConfig.cp_comm_type, handed to every core attention)
picks Ulysses ("a2a", the default) or the all-gathered KV ("all_gather").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from models.attention.cp import ContextParallelOps, cp_ops_for, resolve_cp_comm


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
                                    cu_seqlens=cu, dropout_p=p, cp_comm=self.cp_comm)
            return out.reshape(s, b, nq * d)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = causal_attention(q, k, v, cu, self.softmax_scale, dropout_p=p)
        return out.permute(2, 0, 1, 3).reshape(s, b, nq * d)


def causal_attention(q, k, v, cu_seqlens, scale: float, dropout_p: float = 0.0):
    """Causal GQA attention on [b, h, s, d] tensors; with cu_seqlens (batch 1), per document."""
    gqa = k.shape[1] != q.shape[1]
    if cu_seqlens is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)
    if q.shape[0] != 1:
        raise ValueError("packed sequences (cu_seqlens) need micro batch size 1")
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[:, :, start:end] = F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True,
                dropout_p=dropout_p, scale=scale, enable_gqa=gqa)
    return out
