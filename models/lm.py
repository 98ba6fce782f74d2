"""The Qwen3-MoE-style language model as megatron-core specs, and its builder.

`build_lm` takes the model config, the parallel sizes and the process groups as arguments (it never
reads global process-group state itself) and returns a megatron `GPTModel` chunk for one pipeline
stage (and virtual stage). Layers are built from per-layer specs, so the attention variant of each
layer comes from `models.attention.attention_spec` and the layer class never branches on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from models.attention import attention_spec
from models.config import LMConfig, ModelParallelSizes
from models.moe.chunked_loss_gpt import ChunkedLossMixin
from models.moe.router import PackedSeqDocuments
from models.moe.spec import moe_module_spec
from models.norm import RMSNorm


def transformer_config(lm: LMConfig, sizes: ModelParallelSizes, *, bf16: bool,
                       use_cpu_initialization: bool, recompute: str | None = None,
                       calculate_per_token_loss: bool = True, deterministic: bool = False) -> TransformerConfig:
    """Megatron TransformerConfig for the language model. `deterministic`: megatron's deterministic_mode
    (train.deterministic; its embedding lookup then has a deterministic backward)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    recompute_kwargs = {}
    if recompute == "full":
        recompute_kwargs = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        recompute_kwargs = dict(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        num_query_groups=lm.num_query_groups,
        kv_channels=lm.head_dim,
        ffn_hidden_size=lm.moe_ffn_hidden_size,
        moe_ffn_hidden_size=lm.moe_ffn_hidden_size,
        num_moe_experts=lm.num_experts,
        moe_router_topk=lm.moe_topk,
        # softmax over the top-k logits == softmax over all experts renormalised within the top-k
        # (Qwen3's norm_topk_prob); pre-softmax keeps the un-renormalised probabilities.
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not lm.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=lm.moe_aux_loss_coeff,
        moe_router_dtype=lm.moe_router_dtype,
        moe_token_dispatcher_type=sizes.moe_dispatcher,
        moe_grouped_gemm=False,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_eps,
        qk_layernorm=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=lm.init_std,
        tensor_model_parallel_size=sizes.tp,
        pipeline_model_parallel_size=sizes.pp,
        virtual_pipeline_model_parallel_size=sizes.vpp,
        expert_model_parallel_size=sizes.ep,
        expert_tensor_parallel_size=sizes.etp,
        context_parallel_size=sizes.cp,
        cp_comm_type=sizes.cp_comm if sizes.cp > 1 else None,  # read by our core attention modules
        sequence_parallel=sizes.sequence_parallel,
        params_dtype=dtype,
        bf16=bf16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        use_cpu_initialization=use_cpu_initialization,
        calculate_per_token_loss=calculate_per_token_loss,
        mrope_section=list(lm.mrope_section),
        # gloo cannot batch isend/irecv correctly for interleaved schedules (silently wrong grads).
        batch_p2p_comm=False,
        deallocate_pipeline_outputs=True,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deterministic_mode=deterministic,
        **recompute_kwargs,
    )


class DocumentRoutingLayer(TransformerLayer):
    """megatron's TransformerLayer that hands its router the documents of the call's packed row (a
    `PackedSeqDocuments` packed_seq_params, as the trainer gives them) for the time of the call: its padding is routed
    to no expert and counted in no balancing, and model.lm.moe_balance=sequence balances each document
    (models/moe/router.py). The documents come with the call's arguments, so a layer run again in the backward (full
    recompute) routes with its own micro-batch's documents."""

    def forward(self, *args, **kwargs):
        router = getattr(self.mlp, "router", None)
        if router is None or not hasattr(router, "documents"):
            return super().forward(*args, **kwargs)
        params = kwargs.get("packed_seq_params")
        router.documents = params if isinstance(params, PackedSeqDocuments) else None
        try:
            return super().forward(*args, **kwargs)
        finally:
            router.documents = None


def layer_spec(lm: LMConfig, variant: str, layer_index: int, *, cp_ops=None) -> ModuleSpec:
    """One decoder layer: RMSNorm -> attention (variant) -> residual -> RMSNorm -> MoE -> residual."""
    return ModuleSpec(
        module=DocumentRoutingLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=attention_spec(variant, lm, layer_index, cp_ops=cp_ops),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=moe_module_spec(num_experts=lm.num_experts, experts_impl=lm.experts_impl,
                                expert_bias=lm.moe_expert_bias, balance=lm.moe_balance),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def block_spec(lm: LMConfig, config: TransformerConfig, *, pp_rank: int, vp_stage: int | None,
               cp_ops=None) -> TransformerBlockSubmodules:
    """The layer specs of the layers this (virtual) pipeline stage owns, plus the final norm."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    variants = lm.layer_attention()[offset: offset + count]
    return TransformerBlockSubmodules(layer_specs=[layer_spec(lm, v, offset + i, cp_ops=cp_ops)
                                                   for i, v in enumerate(variants)],
                                      layer_norm=RMSNorm)


def build_lm(lm: LMConfig, config: TransformerConfig, *, pg_collection, pp_rank: int, pp_size: int,
             vp_stage: int | None = None, vpp_size: int | None = None, cp_ops=None) -> GPTModel:
    """Builds the model chunk of pipeline rank `pp_rank` (and virtual stage `vp_stage`).

    cp_ops: the context-parallel attention functions (models/attention/cp.py's interface), required when
    config.context_parallel_size > 1; the caller injects them (train/ passes parallel/context's)."""
    first = pp_rank == 0 and (vp_stage is None or vp_stage == 0)
    last = pp_rank == pp_size - 1 and (vp_stage is None or vp_stage == (vpp_size or 1) - 1)
    model = KeyeLM(
        num_summary=lm.ksa.num_summary if lm.uses_ksa else 0,
        loss_chunk_tokens=lm.loss_chunk_tokens,
        config=config,
        transformer_layer_spec=block_spec(lm, config, pp_rank=pp_rank, vp_stage=vp_stage, cp_ops=cp_ops),
        vocab_size=lm.vocab_size,
        max_sequence_length=lm.max_position_embeddings,
        pre_process=first,
        post_process=last,
        share_embeddings_and_output_weights=not lm.untie_embeddings,
        position_embedding_type="mrope",
        rotary_base=int(lm.rope_theta),
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    mark_expert_params(model)
    return model


class KeyeLM(ChunkedLossMixin, GPTModel):
    """megatron's GPTModel with explicit [3, b, s] positions (multimodal RoPE), the chunked
    cross-entropy (models/moe/chunked_ce.py; `loss_chunk_tokens` 0 = megatron's loss) and, for KSA, a
    table of summary-token embeddings.

    Summary slots carry token ids vocab_size + slot (slot < num_summary); their embedding comes from
    `summary_embedding`, not from the vocabulary table, and the output layer never predicts them.
    """

    def __init__(self, *, num_summary: int = 0, loss_chunk_tokens: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.loss_chunk_tokens = loss_chunk_tokens or None
        self.num_summary = num_summary
        if num_summary and self.pre_process:
            self.summary_embedding = torch.nn.Parameter(
                torch.empty(num_summary, self.config.hidden_size, dtype=self.config.params_dtype))
            torch.nn.init.normal_(self.summary_embedding, std=self.config.init_method_std)

    def forward(self, *args, visual=None, **kwargs):
        """`visual`: (embeddings [V, h], positions [V]) of one packed row (batch 1): the vision tower's
        merged tokens, written over the placeholder tokens at those sequence positions."""
        self._visual = visual
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._visual = None

    def _insert_visual(self, decoder_input, input_ids):
        embeds, pos = self._visual
        s, b = input_ids.shape[1], input_ids.shape[0]
        if b != 1:
            raise ValueError(f"visual tokens need one packed sequence per micro-batch, got batch {b}")
        if embeds.shape[0] != pos.shape[0]:
            raise ValueError(f"{embeds.shape[0]} visual embeddings for {pos.shape[0]} visual positions")
        extra = decoder_input.new_zeros(s, 1, decoder_input.shape[-1], dtype=embeds.dtype)
        extra = extra.index_put((pos, torch.zeros_like(pos)), embeds)  # differentiable in embeds
        keep = torch.ones(s, 1, 1, dtype=decoder_input.dtype, device=decoder_input.device)
        keep[pos] = 0
        if self.config.sequence_parallel:
            from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

            extra = scatter_to_sequence_parallel_region(extra, group=self.pg_collection.tp)
            keep = scatter_to_sequence_parallel_region(keep, group=self.pg_collection.tp)
        return decoder_input * keep + extra.to(decoder_input.dtype)

    def _preprocess(self, input_ids, position_ids, decoder_input=None, *args, **kwargs):
        visual = getattr(self, "_visual", None) is not None and self.pre_process and decoder_input is None
        if visual and not self.num_summary:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=position_ids)
        if self.num_summary and self.pre_process and decoder_input is None:
            is_summary = input_ids >= self.vocab_size
            decoder_input = self.embedding(input_ids=torch.where(is_summary, 0, input_ids), position_ids=position_ids)
            slot = (input_ids - self.vocab_size).clamp(0, self.num_summary - 1)
            extra = (self.summary_embedding[slot] * is_summary[..., None]).transpose(0, 1)  # [s, b, h]
            keep = (~is_summary).transpose(0, 1)[..., None]
            if self.config.sequence_parallel:
                from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region

                extra = scatter_to_sequence_parallel_region(extra.contiguous(), group=self.pg_collection.tp)
                keep = scatter_to_sequence_parallel_region(keep.contiguous(), group=self.pg_collection.tp)
            decoder_input = decoder_input * keep.to(decoder_input.dtype) + extra.to(decoder_input.dtype)
        if visual:  # the visual positions index the interleaved sequence: never a summary slot
            decoder_input = self._insert_visual(decoder_input, input_ids)
        return super()._preprocess(input_ids, position_ids, decoder_input, *args, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if getattr(self, "summary_embedding", None) is not None:
            from megatron.core.dist_checkpointing.mapping import ShardedTensor

            key = f"{prefix}summary_embedding"
            sd[key] = ShardedTensor.from_rank_offsets(key, self.summary_embedding,
                                                      replica_id=(0, self.pg_collection.tp.rank(),
                                                                  self.pg_collection.dp_cp.rank()))
        return sd


def mark_expert_params(model: torch.nn.Module) -> None:
    """Tags every expert weight `allreduce=False`, so DDP reduces it over the expert-data-parallel group.

    megatron-core tags expert weights only when expert_model_parallel_size > 1 and otherwise reduces
    them over the dense data-parallel group. That group is the wrong one whenever the expert tensor
    parallel size differs from TP (e.g. TP=2, ETP=1, EP=1: experts are replicated over 2 expert-DP
    ranks while dense DP is 1), and the expert gradients silently stay partial.
    """
    for name, param in model.named_parameters():
        if ".experts." in name:
            param.allreduce = False


def freeze_for_stage(chunks, trainable: str) -> int:
    """Sets requires_grad for a training stage; returns the number of frozen parameter tensors.

    all: everything trains. summary: only KSA summary parameters (summary embeddings and the summary
    QKV projections) train (KSA conversion, stage 1). indexer: only the DSA indexers train (DSA dense
    warm-up). The rest of the model is frozen. A pipeline stage may hold none of the set's parameters (its layers are
    of another attention variant) and is then frozen whole; that the model has some is the config's check
    (train/launch.check_attention_stage): a stage raising here alone left the other stages waiting for it.
    """
    if trainable not in TRAINABLE_MARKERS:
        raise ValueError(f"unknown trainable set {trainable!r}; known: {sorted(TRAINABLE_MARKERS)}")
    marker = TRAINABLE_MARKERS[trainable]
    frozen = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            train = marker is None or marker in name
            p.requires_grad_(train)
            frozen += not train
    return frozen


TRAINABLE_MARKERS = {"all": None, "summary": "summary", "indexer": ".indexer."}


@torch.no_grad()
def copy_text_qkv_to_summary(chunks) -> None:
    """Starts every summary QKV projection as a copy of its layer's text projection (conversion from dense)."""
    from models.attention.ksa import KSASelfAttention

    for chunk in chunks:
        for m in chunk.modules():
            if isinstance(m, KSASelfAttention):
                m.linear_qkv_summary.weight.copy_(m.linear_qkv.weight)
