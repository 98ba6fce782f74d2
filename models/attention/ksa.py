"""Kwai Summary Attention (KSA) for the language model's attention slot.

The input sequence is interleaved: after every C text tokens of a document come S summary tokens
(models/ksa_tokens.py builds it; inside a document, index i is a summary iff i % (C+S) >= C).
- `KSASelfAttention`: megatron's SelfAttention with a second QKV projection, `linear_qkv_summary`,
  used at summary positions (summary tokens have their own Q/K/V projections and share the QK norms).
  The text projection keeps megatron's `linear_qkv` name, so a dense checkpoint loads into it unchanged
  (the conversion recipe starts from one).
- `KSACoreAttention`: the attention itself through kernels.ksa (Triton on GPU, the mask reference on
  CPU), with this layer's window W (previous chunks whose raw text a text query sees).
- Teacher mode (`ksa_teacher_mode(model)`): every KSA layer runs plain causal attention with the text
  projection, which is the dense model the distillation stage compares against (fed text only).

Shapes (megatron layout): hidden [s, b, h]; q [s, b, nq, d], k/v [s, b, nkv, d].

Context parallelism (the CP group of `pg_collection` has > 1 rank): the CP split is of the INTERLEAVED
sequence, so `s` is this rank's share of text + summary tokens. Which local tokens are summaries comes
from their GLOBAL positions (`cp_ops.summary_mask`), and the attention runs by Ulysses (`cp_ops.ksa`: the
unchanged KSA kernel over the whole interleaved sequence for Hq / cp heads, GLOBAL cu_seqlens). Teacher
mode runs dense CP attention the same way. `cp_ops` is injected through the spec (models/attention/cp.py;
parallel/context implements it).
"""

from __future__ import annotations

import contextlib
import math

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule

from kernels.ksa import ksa_attention
from models.attention.cp import ContextParallelOps, cp_ops_for, resolve_cp_comm
from models.attention.dense import causal_attention, documents_part, padding_tail, with_padding_rows
from models.attention.layer_axis import on_variant_axis


def summary_mask(num_tokens: int, batch: int, *, chunk: int, num_summary: int,
                 cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """[s, b] bool: True at summary positions of the interleaved sequence."""
    pos = torch.arange(num_tokens, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        doc = torch.searchsorted(cu[1:], pos, right=True)
        pos = pos - cu[doc]
    mask = (pos % (chunk + num_summary)) >= chunk
    return mask[:, None].expand(num_tokens, batch)


class _MergedQKV(torch.nn.Module):
    """Calls the text and the summary projection and takes each position's row from the right one."""

    def __init__(self, text, summary, mask):
        super().__init__()
        self.text, self.summary, self.mask = text, summary, mask

    def forward(self, hidden_states):
        out, bias = self.text(hidden_states)
        out_s, _ = self.summary(hidden_states)
        return torch.where(self.mask[..., None], out_s, out), bias


class KSASelfAttention(SelfAttention):
    def __init__(self, config, submodules, layer_number: int, attn_mask_type=None, cp_comm_type=None,
                 pg_collection=None, chunk: int = 8, num_summary: int = 1, cp_ops: ContextParallelOps | None = None,
                 summary_place: tuple[int, int] | None = None, **unused):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        self.chunk, self.num_summary = chunk, num_summary
        self.linear_qkv_summary = submodules.linear_qkv(
            self.config.hidden_size, self.linear_qkv_out_dim, config=self.config,
            init_method=self.config.init_method, gather_output=False, bias=False, skip_bias_add=False,
            is_expert=False, tp_comm_buffer_name="qkv", tp_group=self.pg_collection.tp)
        self.teacher = False
        self._mask = None
        self.cp_group, self.cp_ops = cp_ops_for(config, self.pg_collection, cp_ops)
        # the summary QKV's place on its checkpoint tensors' layer axis when only some layers are KSA
        # (models/attention/layer_axis.py); None keeps megatron's
        self.summary_place = summary_place

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.summary_place is not None:
            sub = f"{prefix}linear_qkv_summary."
            for k in [k for k in sd if k.startswith(sub)]:
                del sd[k]
            sd.update(self.linear_qkv_summary.sharded_state_dict(
                sub, on_variant_axis(sharded_offsets, self.summary_place), metadata))
        return sd

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        if self.teacher or self._mask is None:
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                       split_qkv=split_qkv)
        text = self._modules["linear_qkv"]
        self._modules["linear_qkv"] = _MergedQKV(text, self.linear_qkv_summary, self._mask)
        try:
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                       split_qkv=split_qkv)
        finally:
            self._modules["linear_qkv"] = text

    def forward(self, hidden_states, attention_mask, *args, packed_seq_params=None, **kwargs):
        s, b = hidden_states.shape[0], hidden_states.shape[1]
        if self.config.sequence_parallel:
            s *= self.pg_collection.tp.size()  # the QKV projection all-gathers the sequence shards
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        if self.teacher:
            self._mask = None
        elif self.cp_group is not None:  # s = this rank's share: roles come from the global positions
            self._mask = self.cp_ops.summary_mask(s * self.cp_group.size(), b, chunk=self.chunk,
                                                  num_summary=self.num_summary, cu_seqlens=cu, cp_group=self.cp_group,
                                                  device=hidden_states.device)
        else:
            self._mask = summary_mask(s, b, chunk=self.chunk, num_summary=self.num_summary, cu_seqlens=cu,
                                      device=hidden_states.device)
        try:
            return super().forward(hidden_states, attention_mask, *args, packed_seq_params=packed_seq_params, **kwargs)
        finally:
            self._mask = None


class KSACoreAttention(MegatronModule):
    """Core attention of a KSA layer: kernels.ksa on the interleaved sequence, or causal in teacher mode."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, chunk: int = 8, num_summary: int = 1,
                 window: int = 128, backend: str = "auto", cp_ops: ContextParallelOps | None = None):
        super().__init__(config=config)
        self.cp_group, self.cp_ops = cp_ops_for(config, pg_collection, cp_ops)
        tp = config.tensor_model_parallel_size
        # KSA runs by Ulysses only (the kernel needs the whole interleaved sequence): check the head split;
        # the teacher's dense attention follows cp_comm_type
        heads = dict(num_q_heads=config.num_attention_heads // tp, num_kv_heads=config.num_query_groups // tp,
                     cp_size=config.context_parallel_size, cp_ops=self.cp_ops)
        resolve_cp_comm("a2a", **heads)
        self.cp_comm = resolve_cp_comm(cp_comm_type, **heads)
        self.chunk, self.num_summary, self.window = chunk, num_summary, window
        self.backend = backend
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.teacher = False

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b, nq, d = query.shape
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, h, d]
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        if self.cp_group is not None:  # s = this rank's tokens; cu = global (interleaved) boundaries
            if self.teacher:
                out = self.cp_ops.dense(query, key, value, cp_group=self.cp_group, scale=self.scale, cu_seqlens=cu,
                                        cp_comm=self.cp_comm, pad_tail=padding_tail(packed_seq_params))
            else:
                out = self.cp_ops.ksa(query, key, value, cp_group=self.cp_group, chunk=self.chunk, window=self.window,
                                      num_summary=self.num_summary, cu_seqlens=cu, scale=self.scale,
                                      backend=self.backend, pad_tail=padding_tail(packed_seq_params))
            return out.reshape(s, b, nq * d)
        n, cu = documents_part(s, packed_seq_params)  # the row without its trailing padding
        q, k, v = q[:, :n], k[:, :n], v[:, :n]
        if self.teacher:
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cu, self.scale).transpose(1, 2)
        else:
            backend = self.backend
            if backend == "auto":
                backend = "triton" if q.is_cuda else "naive"
            out = ksa_attention(q.contiguous(), k.contiguous(), v.contiguous(), chunk=self.chunk,
                                window=self.window, num_summary=self.num_summary, cu_seqlens=cu,
                                scale=self.scale, backend=backend)
        return with_padding_rows(out.transpose(0, 1), s, 0).reshape(s, b, nq * d)


@contextlib.contextmanager
def ksa_teacher_mode(model: torch.nn.Module):
    """Inside: KSA layers attend causally over text with the text projection (the dense teacher)."""
    mods = [m for m in model.modules() if isinstance(m, (KSASelfAttention, KSACoreAttention))]
    for m in mods:
        m.teacher = True
    try:
        yield
    finally:
        for m in mods:
            m.teacher = False
