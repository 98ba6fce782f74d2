"""Attention variants for the language model's attention slot.

Each variant is a function `(LMConfig, layer_index, *, cp_ops) -> ModuleSpec` for the layer's
`self_attention` submodule, so a layer is built from a spec and never branches on the variant itself.
`cp_ops` (models/attention/cp.py's `ContextParallelOps`, None without context parallelism) is the
context-parallel implementation the caller injects (train/ passes parallel/context's); the specs hand it
to the modules that call it.
"""

from __future__ import annotations

from typing import Callable

from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from models.attention.cp import ContextParallelOps
from models.attention.dense import SDPACoreAttention
from models.attention.dsa import DSACoreAttention, DSASelfAttention
from models.attention.ksa import KSACoreAttention, KSASelfAttention
from models.attention.layer_axis import variant_place
from models.norm import RMSNorm


def dense_attention_spec(cfg, layer_index: int, *, cp_ops: ContextParallelOps | None = None) -> ModuleSpec:
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=ModuleSpec(module=SDPACoreAttention, params={"cp_ops": cp_ops}),
            linear_proj=RowParallelLinear,
            q_layernorm=RMSNorm,
            k_layernorm=RMSNorm,
        ),
    )


def ksa_attention_spec(cfg, layer_index: int, *, cp_ops: ContextParallelOps | None = None) -> ModuleSpec:
    k = cfg.ksa
    return ModuleSpec(
        module=KSASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, "chunk": k.chunk, "num_summary": k.num_summary,
                "cp_ops": cp_ops, "summary_place": variant_place(cfg, layer_index)},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=ModuleSpec(module=KSACoreAttention,
                                      params={"chunk": k.chunk, "num_summary": k.num_summary,
                                              "window": k.window(layer_index), "backend": k.backend,
                                              "cp_ops": cp_ops}),
            linear_proj=RowParallelLinear,
            q_layernorm=RMSNorm,
            k_layernorm=RMSNorm,
        ),
    )


def dsa_attention_spec(cfg, layer_index: int, *, cp_ops: ContextParallelOps | None = None) -> ModuleSpec:
    d = cfg.dsa
    return ModuleSpec(
        module=DSASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, "index_heads": d.index_heads, "index_dim": d.index_dim,
                "indexer_place": variant_place(cfg, layer_index)},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=ModuleSpec(module=DSACoreAttention,
                                      params={"topk": d.topk, "stage": d.stage, "loss_weight": d.loss_weight,
                                              "backend": d.backend, "cp_ops": cp_ops}),
            linear_proj=RowParallelLinear,
            q_layernorm=RMSNorm,
            k_layernorm=RMSNorm,
        ),
    )


ATTENTION_SPECS: dict[str, Callable] = {
    "dense": dense_attention_spec,
    "dsa": dsa_attention_spec,
    "ksa": ksa_attention_spec,
}


def attention_spec(variant: str, cfg, layer_index: int, *, cp_ops: ContextParallelOps | None = None) -> ModuleSpec:
    try:
        make = ATTENTION_SPECS[variant]
    except KeyError:
        raise ValueError(f"unknown attention variant {variant!r}; known: {sorted(ATTENTION_SPECS)}") from None
    return make(cfg, layer_index, cp_ops=cp_ops)
