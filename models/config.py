"""Typed configuration of the language model (the `model.lm` node of a recipe) and its size arithmetic.

Presets live as YAML under `recipes/model/`; this file holds the schema, its validation, and the
parameter/FLOP counts derived from it without allocating anything.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

ATTENTION_VARIANTS = ("dense", "dsa", "ksa")
EXPERT_IMPLS = ("sequential", "auto", "torch_grouped_mm", "triton", "loop")
MOE_BALANCES = ("micro_batch", "global_batch", "sequence")   # model.lm.moe_balance (models/moe/router.py)
KSA_BACKENDS = ("auto", "triton", "naive", "flex")


@dataclass
class KSAConfig:
    """Kwai Summary Attention: S summary tokens after every C text tokens; W per layer from `windows`.

    Layer i uses windows[i % len(windows)] chunks of raw text (a window at least the number of chunks
    in the sequence is full causal attention over the text). The released 1.9B configuration mixes
    3 KSA layers (W=128) with 1 long-window layer (W=1024), which is the default here.
    """

    chunk: int = 8
    num_summary: int = 1
    windows: list[int] = field(default_factory=lambda: [128, 128, 128, 1024])
    backend: str = "auto"  # triton on GPU, the mask reference on CPU

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.num_summary < 1:
            raise ValueError(f"model.lm.ksa.chunk ({self.chunk}) and num_summary ({self.num_summary}) must be >= 1")
        if not self.windows or min(self.windows) < 0:
            raise ValueError(f"model.lm.ksa.windows must be a non-empty list of windows >= 0, got {self.windows}")
        if self.backend not in KSA_BACKENDS:
            raise ValueError(f"model.lm.ksa.backend must be one of {KSA_BACKENDS}, got {self.backend!r}")

    def window(self, layer_index: int) -> int:
        return self.windows[layer_index % len(self.windows)]


DSA_STAGES = ("dense_warmup", "sparse")
DSA_BACKENDS = ("auto", "triton", "naive")


@dataclass
class DSAConfig:
    """DeepSeek Sparse Attention for GQA (Keye-VL-2.0 shipped settings by default)."""

    index_heads: int = 16
    index_dim: int = 64
    topk: int = 2048
    stage: str = "sparse"  # dense_warmup: dense attention, only the indexer learns (KL over all keys)
    loss_weight: float = 1.0  # lambda of total = LM + lambda * KL
    backend: str = "auto"  # triton on GPU, the reference on CPU

    def __post_init__(self) -> None:
        if not math.isfinite(self.loss_weight):   # nan passed the sign check below: a NaN loss from the first step
            raise ValueError(f"model.lm.dsa.loss_weight must be a finite number, got {self.loss_weight}")
        for name in ("index_heads", "index_dim", "topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.lm.dsa.{name} must be >= 1, got {getattr(self, name)}")
        if self.stage not in DSA_STAGES:
            raise ValueError(f"model.lm.dsa.stage must be one of {DSA_STAGES}, got {self.stage!r}")
        if self.backend not in DSA_BACKENDS:
            raise ValueError(f"model.lm.dsa.backend must be one of {DSA_BACKENDS}, got {self.backend!r}")
        if self.loss_weight < 0:
            raise ValueError(f"model.lm.dsa.loss_weight must be >= 0, got {self.loss_weight}")
        if self.index_dim % 2:   # half-split RoPE rotates the first half of every index vector against the second
            raise ValueError(f"model.lm.dsa.index_dim must be even (the indexer's RoPE pairs its two halves), "
                             f"got {self.index_dim}")


@dataclass
class LMConfig:
    """A Qwen3-MoE-style decoder: RMSNorm, QK-norm, GQA, RoPE, MoE FFN on every layer, untied embeddings."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    head_dim: int = 16
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    rope_theta: float = 1.0e7
    # Multimodal RoPE: rotary channel pairs given to the (time, height, width) position rows. Text has
    # three equal rows, which makes it exactly 1-D RoPE at the given positions (so packed documents,
    # KSA summaries and video frames all carry explicit positions). Sum = head_dim / 2.
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])
    norm_eps: float = 1.0e-6
    # Mixture of experts (every layer is an MoE layer, as in Qwen3-30B-A3B).
    num_experts: int = 4
    moe_topk: int = 2
    moe_ffn_hidden_size: int = 32
    moe_aux_loss_coeff: float = 1.0e-3
    # the level the balancing loss counts the experts' load at (models/moe/router.py): "micro_batch" (megatron's
    # aux_loss), "global_batch" (Qwen3: the step's micro-batches so far on every data-parallel replica) or
    # "sequence" (DeepSeek-V3's sequence-wise loss, per document of a packed row, weighted by its tokens)
    moe_balance: str = "micro_batch"
    moe_norm_topk_prob: bool = True  # Qwen3 renormalises the top-k router probabilities to sum to 1
    moe_router_dtype: str = "fp32"
    # auxiliary-loss-free balancing (DeepSeek-V3; models/moe/router.py): a per-expert bias added to the router's
    # softmax scores for the top-k choice only (never to the gate weights), moved after every applied step by
    # moe_bias_update_rate x sign(mean load - expert load) over the step's tokens of the whole world
    moe_expert_bias: bool = False
    moe_bias_update_rate: float = 1.0e-3
    # experts: "sequential" = megatron's SequentialMLP (a loop over experts); otherwise models/moe's
    # GroupedExperts with this implementation ("auto": torch grouped GEMM on a GPU in bf16, else a loop)
    experts_impl: str = "auto"
    # cross-entropy over the vocabulary in chunks of this many tokens (fp32 logits of one chunk at a
    # time); 0 = megatron's loss, which holds fp32 logits of the whole micro-batch
    loss_chunk_tokens: int = 4096
    init_std: float = 0.02
    untie_embeddings: bool = True
    # Attention variant per layer: one name for all layers, or a list with one name per layer.
    attention: str = "dense"
    attention_per_layer: list[str] = field(default_factory=list)
    ksa: KSAConfig = field(default_factory=KSAConfig)
    dsa: DSAConfig = field(default_factory=DSAConfig)

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
                     "vocab_size", "num_experts", "moe_topk", "moe_ffn_hidden_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.lm.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.lm.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.lm.num_query_groups ({self.num_query_groups})")
        if self.moe_topk > self.num_experts:
            raise ValueError(f"model.lm.moe_topk ({self.moe_topk}) exceeds model.lm.num_experts ({self.num_experts})")
        if self.experts_impl not in EXPERT_IMPLS:
            raise ValueError(f"model.lm.experts_impl must be one of {EXPERT_IMPLS}, got {self.experts_impl!r}")
        if self.loss_chunk_tokens < 0:
            raise ValueError(f"model.lm.loss_chunk_tokens must be >= 0, got {self.loss_chunk_tokens}")
        for name in ("rope_theta", "norm_eps", "init_std", "moe_aux_loss_coeff", "moe_bias_update_rate"):
            # nan passed the sign checks below and inf the positive ones: moe_aux_loss_coeff=nan trained without any
            # load balancing (megatron applies the loss for a coefficient > 0), init_std=inf made every weight inf
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"model.lm.{name} must be a finite number, got {getattr(self, name)}")
        for name in ("rope_theta", "norm_eps", "init_std"):   # a normal of std <= 0 fails only when the model is built
            if not getattr(self, name) > 0:
                raise ValueError(f"model.lm.{name} must be > 0, got {getattr(self, name)}")
        if self.moe_aux_loss_coeff < 0:   # a negative coefficient rewards routing every token to the same experts
            raise ValueError(f"model.lm.moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")
        if self.moe_balance not in MOE_BALANCES:
            raise ValueError(f"model.lm.moe_balance must be one of {MOE_BALANCES}, got {self.moe_balance!r}")
        if self.moe_aux_loss_coeff == 0 and self.moe_balance != "micro_batch":
            warnings.warn(f"model.lm.moe_balance={self.moe_balance} is ignored: model.lm.moe_aux_loss_coeff is 0 (no "
                          f"balancing loss)")
        if self.moe_expert_bias and not self.moe_bias_update_rate > 0:
            # 0 keeps the bias at zero (plain routing), a negative rate pushes tokens onto the busiest experts
            raise ValueError(f"model.lm.moe_bias_update_rate must be > 0 with model.lm.moe_expert_bias, got "
                             f"{self.moe_bias_update_rate}")
        if not self.moe_expert_bias and self.moe_bias_update_rate != LMConfig.moe_bias_update_rate:
            warnings.warn(f"model.lm.moe_bias_update_rate={self.moe_bias_update_rate} is ignored: the routers have no "
                          f"expert bias (model.lm.moe_expert_bias=true turns on auxiliary-loss-free balancing)")
        if self.moe_router_dtype not in ("fp32", "fp64"):
            raise ValueError(f"model.lm.moe_router_dtype must be fp32 or fp64, got {self.moe_router_dtype!r}")
        for v in [self.attention, *self.attention_per_layer]:
            if v not in ATTENTION_VARIANTS:
                raise ValueError(f"model.lm.attention variant {v!r} is not one of {ATTENTION_VARIANTS}")
        if "dsa" in self.layer_attention() and self.dsa.index_dim * 2 > self.head_dim:
            raise ValueError(f"model.lm.dsa.index_dim ({self.dsa.index_dim}) must be at most head_dim / 2 "
                             f"({self.head_dim // 2})")
        if len(self.mrope_section) != 3:
            # megatron's RoPE takes its channel chunks from the rows in turn (chunk i from row i % 3) over both
            # rotate-half halves: with 2 or 4 counts a pair's two channels took different rows (time and width), a
            # turn by no one angle, and the run trained without a word
            raise ValueError(f"model.lm.mrope_section {list(self.mrope_section)} must hold 3 counts (rotary channel "
                             f"pairs of the time, height and width rows), got {len(self.mrope_section)}")
        if min(self.mrope_section, default=0) < 0:   # megatron's RoPE splits its channels by these, in the forward
            raise ValueError(f"model.lm.mrope_section {self.mrope_section} must hold counts >= 0 (rotary channel pairs "
                             f"of the time, height and width rows)")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"model.lm.mrope_section {self.mrope_section} must sum to head_dim / 2 "
                             f"({self.head_dim // 2})")
        if self.attention_per_layer and len(self.attention_per_layer) != self.num_layers:
            raise ValueError(
                f"model.lm.attention_per_layer has {len(self.attention_per_layer)} entries but "
                f"model.lm.num_layers is {self.num_layers}")

    def layer_attention(self) -> list[str]:
        return list(self.attention_per_layer) or [self.attention] * self.num_layers

    def layers_with(self, variant: str) -> list[int]:
        """The layers whose attention is `variant`."""
        return [l for l, kind in enumerate(self.layer_attention()) if kind == variant]

    def with_layer_attention(self, kinds: list[str]) -> LMConfig:
        """This config with layer l's attention kinds[l]: one `attention` when every layer has the same, else
        `attention_per_layer`."""
        one = len(set(kinds)) == 1
        return replace(self, attention=kinds[0] if one else "dense", attention_per_layer=[] if one else list(kinds))

    @property
    def uses_ksa(self) -> bool:
        return "ksa" in self.layer_attention()

    def model_seq_length(self, seq_length: int) -> int:
        """Tokens the model sees for `seq_length` text tokens: with KSA the summary slots of every complete
        chunk are added (the most a packed row can have: a row that is one document)."""
        return seq_length + (self.ksa.num_summary * (seq_length // self.ksa.chunk) if self.uses_ksa else 0)


@dataclass(frozen=True)
class ModelParallelSizes:
    """The parallel degrees a model chunk is built for (validated by parallel.layout)."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    ep: int = 1
    etp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    moe_dispatcher: str = "alltoall"
    cp_comm: str = "a2a"  # dense attention under CP: "a2a" (Ulysses) or "allgather" (K/V gathered)


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int  # parameters touched by one token: attention, router, top-k experts, embeddings, head
    embedding: int


def lm_param_count(cfg: LMConfig) -> ParamCount:
    """Parameter count from the config alone (no allocation); checked against a built model in tests."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    attn = h * (q + 2 * kv) + q * h + 2 * d  # qkv, output projection, q/k RMSNorm weights
    norms = 2 * h  # input and pre-MLP RMSNorm
    router = h * cfg.num_experts
    expert = 3 * h * cfg.moe_ffn_hidden_size  # SwiGLU: gate, up, down
    per_layer_total = attn + norms + router + cfg.num_experts * expert
    per_layer_active = attn + norms + router + cfg.moe_topk * expert
    emb = cfg.vocab_size * h
    head = emb if cfg.untie_embeddings else 0
    final_norm = h
    # KSA: every KSA layer has a second QKV projection for summary tokens, plus S summary embeddings.
    ksa_layers = cfg.layer_attention().count("ksa")
    summary = ksa_layers * h * (q + 2 * kv) + (cfg.ksa.num_summary * h if ksa_layers else 0)
    # DSA: per layer an indexer (query, key, weight projections and the key LayerNorm weight).
    d = cfg.dsa
    indexer = cfg.layer_attention().count("dsa") * (h * (d.index_heads * d.index_dim + d.index_dim + d.index_heads)
                                                     + d.index_dim)
    return ParamCount(
        total=cfg.num_layers * per_layer_total + emb + head + final_norm + summary + indexer,
        active=cfg.num_layers * per_layer_active + emb + head + final_norm + summary + indexer,
        embedding=emb,
    )


def causal_pairs(num_tokens: int, limit: int | None = None) -> int:
    """(query, key) pairs of causal attention over `num_tokens` tokens, each query attending itself and the tokens
    before it, at most `limit` of them (DSA's top-k): sum over t < num_tokens of min(t + 1, limit)."""
    if limit is None or limit >= num_tokens:
        return num_tokens * (num_tokens + 1) // 2
    return limit * (limit + 1) // 2 + limit * (num_tokens - limit)


def ksa_pairs(seq_len: int, *, chunk: int, num_summary: int, window: int) -> int:
    """(query, key) pairs a KSA layer attends over one document of `seq_len` text tokens with its summary slots
    (kernels/ksa/naive.py ksa_mask's rule): a text query of chunk c sees its own chunk's text causally, the text of
    chunks c - window .. c - 1 and the summaries of the chunks before those; a summary query sees its chunk's text
    and the summaries of its chunk up to itself. The last, incomplete chunk has no summary."""
    C, S, W = chunk, num_summary, window
    n, r = divmod(seq_len, C)
    # over the complete chunks c < n: sum of min(c, W) (text chunks in the window), sum of max(0, c - W) (older
    # chunks, seen through their summaries)
    in_window = n * (n - 1) // 2 if n <= W else W * (W - 1) // 2 + W * (n - W)
    older = max(0, n - 1 - W) * max(0, n - W) // 2
    text = n * C * (C + 1) // 2 + C * C * in_window + C * S * older
    summary = n * (S * C + S * (S + 1) // 2)
    tail = r * (r + 1) // 2 + r * C * min(n, W) + r * S * max(0, n - W)
    return text + summary + tail


def lm_flops_per_token(cfg: LMConfig, seq_len: int, *, causal: bool = True, backward: bool = True,
                       trainable: str = "all", teacher: bool = False) -> float:
    """Training FLOPs per text token of a row of `seq_len` text tokens, 2 FLOPs per multiply-add, for every token
    the row holds (with KSA its summary slots too, LMConfig.model_seq_length):

    - forward: every matmul of the active parameters (the attention projections, the router, the top-k experts, the
      output layer; a token goes through one QKV projection, a KSA summary slot through the summary one; the input
      embedding and the summary embeddings are lookups and norms' weights are no matmul), plus each layer's
      attention scores and values, 2 * 2 * q_dim per (query, key) pair it attends: dense causal attention every
      pair s <= t (causal_pairs; the whole square with causal=False), DSA's sparse stage the top-k keys of each
      query, KSA the pairs of its mask (ksa_pairs);
    - backward (unless backward=False: the DSA warm-up's step with train.trainable=indexer and the local indexer
      backward runs the frozen model forward only): the inputs' gradients (as much as the forward's matmuls, twice
      its attention) and the weights' gradients of what trains (`trainable`, train.trainable: all of it, or only
      the summary projections' on the summary slots; a frozen model computes no weight gradient);
    - a DSA layer's indexer: its projections and its scores, 2 * index_heads * index_dim per pair, forward over
      every causal pair (it selects among them); where the indexers train (trainable all or indexer), the weight
      gradients of their projections (their input is detached: no input gradient) and the scores' backward (2x)
      over the pairs the KL covers (the selected ones in the sparse stage, all in the warm-up);
    - teacher (KSA distillation): the dense teacher's forward over the row's text.

    6 x the active parameters and 3 x the attention when everything trains. The row is counted as one document
    (the most attention a packed row can do) and recomputation is not counted (the MFU convention).
    """
    pc = lm_param_count(cfg)
    h, d, L = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    q_dim, kv_dim = cfg.num_attention_heads * d, cfg.num_query_groups * d
    kinds = cfg.layer_attention()
    ksa_layers, dsa_layers = kinds.count("ksa"), kinds.count("dsa")
    qkv = h * (q_dim + 2 * kv_dim)
    ix = cfg.dsa
    indexer = dsa_layers * h * (ix.index_heads * ix.index_dim + ix.index_dim + ix.index_heads)  # its projections
    summary = ksa_layers * qkv + (cfg.ksa.num_summary * h if ksa_layers else 0)
    # per token: one QKV projection, no norm weight, no indexer
    main = pc.active - pc.embedding - L * (2 * h + 2 * d) - h - summary - indexer - dsa_layers * ix.index_dim
    tokens = cfg.model_seq_length(seq_len)
    pairs = index_fwd = index_bwd = 0
    for layer, kind in enumerate(kinds):
        if kind == "ksa":
            pairs += ksa_pairs(seq_len, chunk=cfg.ksa.chunk, num_summary=cfg.ksa.num_summary,
                               window=cfg.ksa.window(layer))
        elif kind == "dsa":
            sparse = ix.stage == "sparse"
            pairs += causal_pairs(tokens, ix.topk if sparse else None)
            index_fwd += causal_pairs(tokens)
            index_bwd += causal_pairs(tokens, ix.topk if sparse else None)
        else:
            pairs += causal_pairs(tokens) if causal else tokens * tokens
    score = 2 * ix.index_heads * ix.index_dim   # one pair's indexer score
    forward = 2.0 * main * tokens + 4 * q_dim * pairs + 2 * indexer * tokens + score * index_fwd
    total = forward
    if backward:
        total += 2.0 * main * tokens + 2 * 4 * q_dim * pairs   # the inputs' gradients
        if trainable == "all":
            total += 2.0 * main * tokens
        elif trainable == "summary":
            total += 2.0 * ksa_layers * qkv * (tokens - seq_len)
    if trainable in ("all", "indexer"):
        total += 2 * indexer * tokens + 2 * score * index_bwd
    if teacher:
        total += 2.0 * main * seq_len + 4 * q_dim * L * causal_pairs(seq_len)
    return total / seq_len


@dataclass
class VisionModelConfig:
    """The `model.vision` node: the native-resolution SigLIP ViT + 2x2 patch-merger projector
    (models/vision). Disabled: a text-only language model. Sizes default to SigLIP-so400m."""

    enabled: bool = False
    depth: int = 27
    hidden: int = 1152
    heads: int = 16
    mlp: int = 4304
    patch: int = 14
    merge: int = 2
    pos_grid: int = 27
    init_std: float = 0.02   # read by nothing: the tower keeps torch's default init (__post_init__ warns when set)

    def build(self, lm_hidden: int):
        """The models.vision.VisionConfig of these sizes, projecting to `lm_hidden` (validates)."""
        from models.vision.config import VisionConfig

        return VisionConfig(depth=self.depth, hidden=self.hidden, heads=self.heads, mlp=self.mlp,
                            lm_hidden=lm_hidden, patch=self.patch, merge=self.merge, pos_grid=self.pos_grid)

    def __post_init__(self) -> None:
        if self.enabled:
            self.build(lm_hidden=1)  # raises naming the field on a bad size
            if self.init_std != VisionModelConfig.init_std:
                warnings.warn(f"model.vision.init_std={self.init_std} is ignored: the vision tower starts from torch's "
                              f"default initialisation of its layers (its position table: normal, std 0.02), or from "
                              f"the weights train.checkpoint.init_from / vision_init_from hold")


@dataclass
class ModelConfig:
    """The `model` node of a recipe: the language model and (optionally) the vision tower."""

    name: str = "keye_tiny"
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionModelConfig = field(default_factory=VisionModelConfig)
