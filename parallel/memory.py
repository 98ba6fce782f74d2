"""Peak memory per rank of a recipe + layout, predicted from the config alone (nothing is allocated).

    python launch/memory.py recipe=keye_30b_a3b_ctx_256k [world_size=16] [overrides ...]

prints a table (GiB per rank): model state (bf16/fp32 parameters, the fp32 gradient buffer, the
distributed optimizer's fp32 master copy + Adam moments sharded over DP x CP for dense and over expert-DP
for expert weights), activations kept for backward per layer type, and the largest of the working sets that are
never alive together (`activation_bytes`): a layer's forward or backward buffers (under full recompute on top of the
layer re-materialised for its backward) and, on the last stage, the output layer + loss, which runs between the last
layer's forward and its backward; with `parallel.offload=activations` (parallel/offload.py) the offloaded layers'
saved tensors are counted as host memory (printed below the total) and one offloaded layer's stays on the device
beside the layers that keep theirs (copied out or prefetched; two where a chunk offloads every layer: offload's
LAYERS_IN_FLIGHT); where the optimizer step holds more than the forward and backward (short sequences), its peak is
the estimate's (a row says by how much). With pipeline parallelism each rank holds its own layers (their attention
variants), its model chunks' forwards in flight as megatron's schedule runs them (in_flight_forwards), the first the
embedding, the last the loss: every rank is evaluated and the heaviest is the estimate (a middle one can be). It is a
GPU estimate (flash-style attention that keeps O(tokens) per head,
no L x L tensor) for the code in this repository as it is: what each module saves for backward is counted from the
modules (models/norm.py, models/attention/*, parallel/context/*, megatron's MoE layer and alltoall dispatcher,
models/moe/chunked_ce.py), tensor by tensor, in the `_attention` / `_moe` functions below; besides what autograd
saves, megatron's alltoall token dispatcher holds every MoE layer's last routing map and permutation indices as
attributes, with any recompute or offload (`dispatcher_bytes`: 192 bytes a token a layer at 30B-A3B sizes).

Legend: L layers, h hidden, d head dim, Hq / Hkv query / KV heads, E experts, k top-k, F expert FFN,
V vocabulary, S model sequence length (text + KSA summaries), C KSA chunk, mbs micro-batch size.
Per rank: t = mbs * S / cp tokens in the attention block, t_sp = t / tp in the sequence-parallel regions
(norms, residual stream, router), T_e = t_sp * k * etp tokens reaching this rank's experts (balanced
routing: every rank receives what it sends), hq = Hq/tp * d, hkv = Hkv/tp * d.

Training stages (`train.trainable`): gradients and optimizer state only for the parameters that train; the
warm-up's indexer-only step (trainable=indexer, indexer_backward=local) runs the frozen model forward only, so
its activations are one working set, not every layer's kept tensors. A frozen model trained through its
backward (trainable=indexer with indexer_backward=model, summary, projector) is counted as full training
keeps it: an upper bound (a frozen layer saves less; bench/RESULTS.md measured 25-42% less).
`train.eval.only` (trainable "none"): nothing trains, so no gradients or optimizer state, and the evaluation runs
forward only, counted as the warm-up's step is.

The vision tower (train/vision.py, parallel/vit_layout.py; `vision_bytes`): its fp32 weights on every rank,
gradients and AdamW state of what trains, and what its phase holds while the language model's schedule runs,
for all micro-batches of a step at once (or of a round of parallel.vit.group): the visual embeddings handed to the LM-input ranks (with their
gradients), and this rank's share of the frames either as ViT activations or, with parallel.vit.recompute, as
their pixels (parallel.vit.layout=replicated: the LM-input ranks encode every frame, later pipeline stages none).
Upper bound: every token of a sequence visual (seq_length merged tokens).

Not counted (state it rather than hide it): the CUDA context and NCCL buffers (~1-2 GiB per GPU, outside
torch's allocator and outside max_memory_allocated), allocator fragmentation (reported separately as a
stated 10 % margin), routing imbalance (T_e grows with the busiest expert), torch.compile / Triton
workspaces, and the vision tower's transient working set in its own phases (the LM's activations are not
alive then).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kernels.dsa.indexer_loss import LOSS_CHUNK_BYTES
from kernels.dsa.indexer_loss_dense import GPU_CHUNK_BYTES, GPU_KEY_SEGMENT, lse_i_segments
from kernels.dsa.plan import PLAN_CHUNK_BYTES
from kernels.dsa.topk import topk_transient_bytes
from models.config import LMConfig
from parallel.offload import LAYERS_IN_FLIGHT

GIB = 1024 ** 3


@dataclass(frozen=True)
class MemoryInputs:
    """Everything the estimate depends on (from a recipe: model.lm, parallel.*, train.*)."""

    lm: LMConfig
    seq_length: int  # text tokens per sample (train.seq_length)
    micro_batch_size: int = 1
    num_microbatches: int = 1
    bf16: bool = True
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int = 1
    cp: int = 1
    dp: int = 1
    edp: int = 1
    distributed_optimizer: bool = True
    recompute: str = "none"  # none | selective (core attention) | full (every layer, uniform, 1 layer per group)
    cp_comm: str = "a2a"
    offload: str = "none"  # none | activations (parallel/offload.py: what offloaded layers save goes to the host)
    offload_layers: int = -1  # per model chunk, from the first; -1 = all but the chunk's last layer
    trainable: str = "all"  # train.trainable: the parameters with gradients and optimizer state; "none": eval only
    indexer_step: bool = False  # trainable=indexer with indexer_backward=local: the step runs forward only
    vision: object = None  # models.vision.VisionConfig of the model's vision tower, None without one
    vit_ranks: int = 1  # ranks that split one sequence's frames (parallel.vit.layout=spread: tp x cp x pp)
    vit_layout: str = "spread"  # parallel.vit.layout: replicated encodes on the LM-input ranks (pipeline rank 0) only
    vit_recompute: bool = False  # parallel.vit.recompute
    vit_group: int = 0  # parallel.vit.group: micro-batches per vision phase (0: the whole step's)
    deterministic: bool = False  # train.deterministic: DSA's sparse backward sums dK / dV in int64, not fp32

    @property
    def model_seq(self) -> int:
        return self.lm.model_seq_length(self.seq_length)

    @property
    def forward_only(self) -> bool:
        """Nothing waits for a backward: the warm-up's indexer-only step, or train.eval.only."""
        return self.indexer_step or self.trainable == "none"


@dataclass
class MemoryEstimate:
    rows: dict[str, float] = field(default_factory=dict)  # bytes per item, of pipeline rank `stage`
    stage: int = 0  # the pipeline rank these rows are of
    host: float = 0.0  # pinned host bytes of offloaded activations (not in the device total)
    ranks: list[float] = field(default_factory=list)  # every pipeline rank's total (estimate())

    @property
    def total(self) -> float:
        return sum(self.rows.values())

    def table(self) -> str:
        width = max(len(k) for k in self.rows) + 2
        lines = [f"{'item':<{width}}{'GiB':>10}", "-" * (width + 10)]
        lines += [f"{k:<{width}}{v / GIB:>10.2f}" for k, v in self.rows.items()]
        lines += ["-" * (width + 10), f"{'predicted peak (allocated)':<{width}}{self.total / GIB:>10.2f}",
                  f"{'+10% fragmentation margin':<{width}}{self.total * 1.1 / GIB:>10.2f}"]
        if self.host:
            lines.append(f"{'host memory (offloaded activations)':<{width}}{self.host / GIB:>10.2f}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ model state
def param_counts(m: MemoryInputs, *, rank: int) -> tuple[float, float]:
    """(dense, expert) parameter elements held by one rank of pipeline rank `rank`'s stage.

    Dense: attention matrices split over TP; norms, the router and the DSA indexer replicated over TP;
    embedding / output layer split over TP on the first / last stage. Expert: E/ep experts of F/etp."""
    lm, tp = m.lm, m.tp
    first, last = rank == 0, rank == m.pp - 1
    h, d = lm.hidden_size, lm.head_dim
    q, kv = lm.num_attention_heads * d, lm.num_query_groups * d
    variants = stage_layers(m, rank=rank)
    layers = len(variants)
    dense = 0.0
    for v in variants:
        dense += (h * (q + 2 * kv) + q * h) / tp + 2 * d + 2 * h + h * lm.num_experts
        if v == "ksa":
            dense += h * (q + 2 * kv) / tp
        if v == "dsa":
            x = lm.dsa
            dense += h * (x.index_heads * x.index_dim + x.index_dim + x.index_heads) + x.index_dim
    if first:
        dense += lm.vocab_size * h / tp + (lm.ksa.num_summary * h if lm.uses_ksa else 0)
    if last:
        dense += (lm.vocab_size * h / tp if lm.untie_embeddings else (0 if first else lm.vocab_size * h / tp)) + h
    expert = layers * (lm.num_experts / m.ep) * 3 * h * lm.moe_ffn_hidden_size / m.etp
    return dense, expert


def trainable_counts(m: MemoryInputs, *, rank: int) -> tuple[float, float]:
    """(dense, expert) elements of the parameters that train (models/lm.freeze_for_stage): all of them, only
    the DSA indexers (trainable=indexer), only the KSA summary embeddings and summary QKV projections
    (summary), or none of the language model's (projector: only the vision projector trains, and the ViT is
    not counted here), or none at all (train.eval.only)."""
    if m.trainable == "all":
        return param_counts(m, rank=rank)
    lm = m.lm
    first = rank == 0
    variants = stage_layers(m, rank=rank)
    h = lm.hidden_size
    if m.trainable == "indexer":
        x = lm.dsa
        return variants.count("dsa") * (h * (x.index_heads * x.index_dim + x.index_dim + x.index_heads)
                                        + x.index_dim), 0.0
    if m.trainable == "summary":
        q, kv = lm.num_attention_heads * lm.head_dim, lm.num_query_groups * lm.head_dim
        return (variants.count("ksa") * h * (q + 2 * kv) / m.tp
                + (lm.ksa.num_summary * h if first and lm.uses_ksa else 0)), 0.0
    if m.trainable in ("projector", "none"):
        return 0.0, 0.0
    raise ValueError(f"unknown trainable set {m.trainable!r}")


def model_state_bytes(m: MemoryInputs, *, rank: int) -> dict[str, float]:
    """Parameters, gradients (megatron DDP keeps an fp32 grad buffer: grad_reduce_in_fp32=True in
    train/trainer.py) and optimizer state (bf16 training: fp32 master copy + Adam m, v = 12 B per element;
    fp32 training: Adam m, v = 8 B), the latter sharded by the distributed optimizer over DP x CP (dense;
    megatron's dp_cp group) and expert-DP (experts). Gradients and optimizer state exist only for the
    parameters that train (megatron's buffers and optimizer take only those that require grad)."""
    dense, expert = param_counts(m, rank=rank)
    t_dense, t_expert = trainable_counts(m, rank=rank)
    pbytes = 2 if m.bf16 else 4
    opt = 12 if m.bf16 else 8
    shard_dense = m.dp * m.cp if m.distributed_optimizer else 1
    shard_expert = m.edp if m.distributed_optimizer else 1
    return {
        "parameters": (dense + expert) * pbytes,
        "gradients (fp32 buffer)": (t_dense + t_expert) * 4,
        "optimizer (master + Adam, sharded)": t_dense * opt / shard_dense + t_expert * opt / shard_expert,
    }


def optimizer_step_bytes(m: MemoryInputs, *, rank: int) -> float:
    """Temporaries of the optimizer step: megatron's optimizer without apex / TransformerEngine is torch's AdamW, whose
    multi-tensor (foreach) update on CUDA computes sqrt(v) of all of a parameter group's tensors at once into new fp32
    tensors, freed before the next group: 4 B per element of the largest group's shard on the rank. Dense and expert
    parameters are separate groups (separate optimizers with expert parallelism); the dense group is taken whole
    (its no-weight-decay part, the norms, is small). Gradient clipping's temporaries come before, one tensor at a
    time, and are smaller. The vision tower's own AdamW (train/vision.py, the same foreach update, unsharded) steps
    before the language model's, its temporaries freed first: the larger of the two counts."""
    t_dense, t_expert = trainable_counts(m, rank=rank)
    shard_dense = m.dp * m.cp if m.distributed_optimizer else 1
    shard_expert = m.edp if m.distributed_optimizer else 1
    return 4 * max(t_dense / shard_dense, t_expert / shard_expert, _vision_trainable(m))


def step_phase_bytes(m: MemoryInputs, *, rank: int) -> float:
    """What a rank holds during its optimizer step: the model state, what the MoE dispatchers keep (every layer's last
    routing map and indices: they outlive the backward), the vision tower's weights and training state, and the
    step's temporaries. The activations are gone by then."""
    if m.trainable == "none":
        return 0.0
    kept = sum(model_state_bytes(m, rank=rank).values()) + dispatchers_kept_bytes(m, rank=rank)
    vision = vision_bytes(m, rank=rank)
    kept += sum(v for k, v in vision.items() if k.startswith(("vision tower weights", "vision gradients")))
    return kept + optimizer_step_bytes(m, rank=rank)


# ------------------------------------------------------------------------------------------ activations
def _norm(elems: float, b: int) -> float:
    """models/norm.RMSNorm in eager mode keeps the fp32 input copy and the fp32 normalised tensor (4 + 4 B
    per element; fp32 input: the copy is the input itself) plus its output (saved by the next op)."""
    return elems * (8 + b)


# Distinct (block, key) entries of the DSA union plan per (token x top-k): 0.48 with the benchmark's smooth
# indexer inputs, 0.73 with iid ones (bench/RESULTS.md, 3,965 and 6,010 keys per 4-token block at top-2048);
# the larger is used so the estimate does not fall short for less local selections.
DSA_UNION_SHARE = 0.75
# transient buffers of the DSA forward's stages, one stage at a time: the top-k selector's score slab and
# candidate lists (kernels/dsa/topk.py topk_transient_bytes: what it allocates for the shape, its chunks of query
# blocks at most 1 GiB); the union plan's padded slots and
# bitmaps (kernels/dsa/plan.py, 256 MiB per chunk) plus, while its packed chunks are joined, a second copy of
# the plan; the indexer loss's fp32 head-summed P (kernels/dsa/indexer_loss.py, 256 MiB per chunk)
# (PLAN_CHUNK_BYTES, LOSS_CHUNK_BYTES: imported from the kernels). The dense (warm-up) stage's
# KL and its gradients in one pass (kernels/dsa/indexer_loss_dense.py): the fp32 d = softmax(I) - P / Z of one
# chunk of rows (at most GPU_CHUNK_BYTES), the fp32 dk_idx, and lse_I's partial sums per key segment
# (GPU_KEY_SEGMENT keys, at most 64 segments: lse_i_segments)


def cp_topk_rows_bytes(seq: int, dsa, elem_bytes: int) -> float:
    """What a context-parallel rank's top-k (parallel/context/dsa._topk_triton) allocates beside the selector's own
    buffers (topk_transient_bytes): it scatters the rank's queries to their global rows, so its output
    ([rows, topk] int32) and its copies of q_idx, w and the index keys span the rows up to the rank's last position,
    the whole sequence `seq` on every rank of the document split, whatever cp (parallel/context/README.md section 3)."""
    return seq * (dsa.topk * 4 + (dsa.index_heads * dsa.index_dim + dsa.index_heads + dsa.index_dim) * elem_bytes)


def _attention(m: MemoryInputs, variant: str, *, recompute_core: bool) -> tuple[float, float]:
    """(kept for backward, transient during the layer's forward) bytes of one attention block."""
    lm, tp, cp = m.lm, m.tp, m.cp
    b = 2 if m.bf16 else 4
    d = lm.head_dim
    Hq, Hkv = lm.num_attention_heads // tp, lm.num_query_groups // tp
    hq, hkv = Hq * d, Hkv * d
    h = lm.hidden_size
    t = m.micro_batch_size * m.model_seq / cp
    t_sp = t / tp
    kept = _norm(t_sp * h, b)  # input norm (its output: the QKV projection's saved input under SP)
    qkv = t * (hq + 2 * hkv) * b  # QKV projection output (v is a view of it: the whole output stays alive)
    qkv_norm = t * (hq + hkv) * 8  # q/k RMSNorm fp32 copies; their outputs feed RoPE ...
    roped = t * (hq + hkv) * b  # ... whose outputs (q, k) the attention saves
    kept += qkv + qkv_norm + roped
    out = t * hq * b  # attention output = the output projection's saved input
    lse = t * Hq * 4
    kept += out
    transient = 2 * t * (hq + 2 * hkv) * b  # the a2a send / receive buffers, or the projection's gather
    core = lse
    if variant in ("dense", "ksa") and cp > 1:
        if variant == "ksa" or m.cp_comm == "a2a":
            # Ulysses: q, k, v, out for the whole sequence of Hq/cp heads (KV replicated up to cp heads)
            hkv_u = max(Hkv, cp) * d
            core += t * (2 * hq + 2 * hkv_u) * b
        else:  # all-gathered K and V of the whole sequence
            core += t * cp * 2 * hkv * b
    if variant == "dsa":
        x = lm.dsa
        S = m.micro_batch_size * m.model_seq
        ind = (t * h * b if tp > 1 else 0)  # the indexer's input is gathered over TP (sequence parallel)
        ind += t * x.index_heads * x.index_dim * (b + 4)  # q_idx (+ fp32 RoPE halves)
        ind += t * x.index_heads * b + t * x.index_dim * (b + 8)  # w, k_idx (+ fp32 LayerNorm)
        ind += (S * x.index_dim * b if cp > 1 else 0)  # gathered index keys
        if x.stage == "sparse":
            ind += t * x.topk * 4  # selected indices, int32
            ind += (S * 2 * hkv * b if cp > 1 else 0)  # all-gathered K, V
            # the union plan (position + token bits, int32 each) that the kernels keep for backward;
            # entries = t * topk * DSA_UNION_SHARE. The KL keeps nothing: its target comes from the attention
            # backward (kernels/dsa/fused.py, on one rank and under CP), into the loss chunk counted below
            plan = t * x.topk * DSA_UNION_SHARE * 8
            ind += plan
            # the backward's fp32 dK / dV (every key the rank's queries can select; int64 fixed point with
            # train.deterministic, kernels/dsa/README.md) and the largest transient of the forward's stages
            # (top-k candidates, plan building, loss chunk)
            # the selector's rows: every token of the micro-batch, or under CP the rank's t against all S keys
            selector = topk_transient_bytes(m.micro_batch_size, m.model_seq, x.topk,
                                            rows=int(t) if cp > 1 else None)
            if cp > 1:  # its [S, topk] output and the query copies at their global rows, alive with the selector's
                selector += cp_topk_rows_bytes(S, x, b)
            stage = max(selector, PLAN_CHUNK_BYTES + plan, LOSS_CHUNK_BYTES)
            transient += 2 * (S if cp > 1 else t) * hkv * (8 if m.deterministic else 4) + stage
        else:
            rows = S if cp > 1 else t  # under CP the rank's rows scattered to their global positions
            transient += (min(GPU_CHUNK_BYTES, rows * S * 4) + rows * x.index_dim * 4
                          + rows * lse_i_segments(S, GPU_KEY_SEGMENT)[1] * 4)
            # the KL's gradients, taken with it: through autograd they wait for the backward, in fp32
            ind += t * (x.index_heads * x.index_dim + x.index_heads + x.index_dim) * 4
            if cp > 1:
                # dense warm-up under CP: the dense KL keeps q and q_idx scattered to Tp = S rows on the
                # rank holding the last chunk (parallel/context/README.md section 3), plus the gathered K
                ind += S * (hq + x.index_heads * x.index_dim) * b + S * hkv * b
        core += ind
        recompute_core = False  # DSA core attention is never checkpointed (models/attention/dsa.py)
    if not recompute_core:
        kept += core
    else:
        transient += core
    return kept, transient


def _moe(m: MemoryInputs) -> tuple[float, float]:
    """(kept, transient) bytes of one MoE block (megatron router + alltoall dispatcher, SwiGLU experts)."""
    lm = m.lm
    b = 2 if m.bf16 else 4
    h, E, k, F = lm.hidden_size, lm.num_experts, lm.moe_topk, lm.moe_ffn_hidden_size
    t_sp = m.micro_batch_size * m.model_seq / m.cp / m.tp
    T_e = t_sp * k * m.etp
    kept = _norm(t_sp * h, b)  # pre-MLP norm (its output feeds the router and the dispatcher)
    kept += t_sp * E * (4 + 4 + 1)  # fp32 router logits, scores, routing map
    kept += t_sp * k * 8 * 2 + T_e * 8  # int64: the router's top-k indices (saved twice), the permutation's
    kept += T_e * h * b  # permuted expert input (fc1's saved input)
    kept += T_e * 2 * F / m.etp * b  # fc1 output (gate, up): SwiGLU's saved input
    if lm.experts_impl == "sequential":  # megatron's SequentialMLP: every intermediate is kept
        kept += T_e * F / m.etp * b  # SwiGLU output: fc2's saved input
        kept += T_e * (h * b + 4)  # expert output and probabilities (the weighted unpermute)
    else:  # models/moe/grouped_experts: saves x, fc1 output and probs; recomputes SwiGLU x prob in backward
        kept += T_e * 4
    transient = 3 * T_e * h * b  # permute output, all-to-all receive buffer, combine buffer
    return kept, transient


def _moe_backward(m: MemoryInputs) -> float:
    """The MoE block's backward buffers at their peak, inside the experts' backward (models/moe/grouped_experts.py),
    besides what the layer keeps: the experts' output gradient dy and input gradient dx (T_e x h each), fc2's input
    gradient da and the recomputed SwiGLU output a (T_e x F), fc1's output gradient dh (T_e x 2F), and the local
    experts' weight gradients (dw13, dw2) before the gradient buffer takes them. The CPU profile of a small layer
    (tests/unit/test_memory_phases.py) finds these at the peak of a layer's backward."""
    lm = m.lm
    b = 2 if m.bf16 else 4
    h, F = lm.hidden_size, lm.moe_ffn_hidden_size / m.etp
    T_e = m.micro_batch_size * m.model_seq / m.cp / m.tp * lm.moe_topk * m.etp
    return (2 * T_e * h + 4 * T_e * F + 3 * lm.num_experts / m.ep * h * F) * b


def dispatcher_bytes(m: MemoryInputs, *, offloaded: bool) -> float:
    """What megatron's alltoall token dispatcher holds as attributes in one MoE layer, besides what autograd saves
    (parallel/offload.py's docstring): the last forward's routing map (bool [t_sp, E], not saved: autograd saves its
    transposed copy) and its permutation indices (int64, t_sp x k), which autograd saves too unless the layer ran
    under full recompute (its saved copy is then the recompute's) or offload moved the saved copy to the host. One
    micro-batch's per layer, whatever the in-flight micro-batches, from the layer's forward until its next one."""
    t_sp = m.micro_batch_size * m.model_seq / m.cp / m.tp
    E, k = m.lm.num_experts, m.lm.moe_topk
    return t_sp * (E + (8 * k if offloaded or m.recompute == "full" else 0))


def dispatchers_kept_bytes(m: MemoryInputs, *, rank: int) -> float:
    """`dispatcher_bytes` of every MoE layer of the stage, from its forward to its next one: the layers that keep their
    saved tensors on the device, and the offloaded ones (whose saved permutation indices went to the host)."""
    mine, offloaded = _stage_layers(m, rank=rank)
    return len(mine) * dispatcher_bytes(m, offloaded=False) + len(offloaded) * dispatcher_bytes(m, offloaded=True)


def _loss(m: MemoryInputs) -> float:
    """The output layer + cross-entropy on the last stage at its peak (models/moe/chunked_ce.py), besides the kept
    activations: the final norm's saved tensors, the per-token logsumexp, the input gradient dh [t, h] and a chunk's
    working set. A chunk holds its logits in the compute dtype with their fp32 copy (in fp32 one tensor), and the
    backward's softmax becomes the gradient g (bf16: a copy, the fp32 softmax freed; fp32: the same tensor), whose
    dW product [V_r, h] is made while the previous chunk's is still referenced; with more than one chunk, beside the
    fp32 dW accumulator. The dW terms exist only when the output layer trains; in the forward-only indexer step a
    chunk holds its logits and their fp32 copy (the backward's gradient chunk never exists)."""
    lm = m.lm
    b = 2 if m.bf16 else 4
    t = m.micro_batch_size * m.model_seq / m.cp
    h, Vr = lm.hidden_size, lm.vocab_size / m.tp
    logits = 4 + (b if b == 2 else 0)  # bytes per logit element: compute-dtype logits + fp32 copy (fp32: one)
    if m.forward_only:  # one chunk's logits while their fp32 copy is made (exp and sum run in place)
        c = min(lm.loss_chunk_tokens, t) if lm.loss_chunk_tokens else t
        return c * Vr * logits + t * 4 + t / m.tp * h * b
    if lm.loss_chunk_tokens:
        c = min(lm.loss_chunk_tokens, t)
        several = t > c
        part = Vr * h * b if m.trainable == "all" else 0  # one chunk's dW product
        acc = Vr * h * 4 if several and m.trainable == "all" else 0
        chunk = max(c * Vr * logits + (part if several else 0),  # the logits, the previous chunk's dW product
                    c * Vr * (b if b == 2 else 4) + part * (2 if several else 1))  # g with the two dW products
        return chunk + acc + t * 4 + _norm(t / m.tp * h, b) + t * h * b
    return t * Vr * (2 + 4 + 4) + _norm(t / m.tp * h, b) + t * h * b


def _schedule_run(m: MemoryInputs) -> int:
    """Micro-batches of one run of the pipeline schedule: a step's, or with the vision tower in rounds
    (parallel.vit.group) a round's."""
    return m.vit_group if m.vision is not None and m.vit_group else m.num_microbatches


def in_flight_forwards(m: MemoryInputs, *, rank: int, weights: list[float] | None = None) -> list[int]:
    """Forwards of each of pipeline rank `rank`'s vpp model chunks whose activations wait for their backward at the
    rank's peak, as megatron's schedule runs them (one run of it, _schedule_run): 1F1B runs pp - rank - 1 warm-up
    forwards, the interleaved schedule 2 (pp - rank - 1) + (vpp - 1) pp (get_pp_rank_microbatches), at most all of
    them; then a forward and a backward in turn. The interleaved schedule takes the chunks of pp micro-batches at a
    time (get_schedule_table), its backwards the chunks in reverse order, so which chunks wait varies: `weights` (bytes
    a forward of each chunk keeps; uniform if None) picks the moment that holds the most. Every rank holds the warm-up
    + 1 forwards: the first pp (1F1B) or pp + (pp - 1) / vpp layer-sets (Korthikanti et al. 2022), the last 1 (1F1B)
    but pp - (pp - 1) / vpp under the interleaved schedule."""
    pp, vpp = m.pp, m.vpp
    if pp == 1:
        return [1] * vpp
    n = _schedule_run(m)
    total = n * vpp
    warmup = pp - rank - 1 if vpp == 1 else 2 * (pp - rank - 1) + (vpp - 1) * pp
    warmup = min(warmup, total)
    chunk = [c for g in range(0, n, pp) for c in range(vpp) for _ in range(g, n if g + pp >= n else g + pp)]
    weights = weights or [1.0] * vpp
    counts, best, best_bytes = [0] * vpp, [0] * vpp, -1.0
    for k in range(total):  # forward k, then (after the warm-up) backward k - warmup
        counts[chunk[k]] += 1
        held = sum(c * w for c, w in zip(counts, weights))
        if held > best_bytes:
            best, best_bytes = list(counts), held
        if k >= warmup:
            counts[vpp - 1 - chunk[k - warmup]] -= 1
    return best


def in_flight_microbatches(m: MemoryInputs, *, rank: int = 0) -> float:
    """Layer-sets (the stage's layers once) whose activations pipeline rank `rank` holds at its peak, chunks alike
    (in_flight_forwards / vpp)."""
    return sum(in_flight_forwards(m, rank=rank)) / m.vpp


def stage_chunks(m: MemoryInputs, *, rank: int) -> list[list[str]]:
    """The attention variants of the layers of each model chunk pipeline rank `rank` holds, chunks in order.
    Model chunk c of pipeline rank r holds the L / (pp * vpp) layers from (c * pp + r) * L / (pp * vpp) on (megatron's
    get_transformer_layer_offset, by which models/lm.block_spec builds them): under the interleaved schedule the first
    rank's are not the model's first L / pp layers."""
    variants = m.lm.layer_attention()
    per_chunk = len(variants) // (m.pp * m.vpp)
    return [variants[(c * m.pp + rank) * per_chunk:(c * m.pp + rank + 1) * per_chunk] for c in range(m.vpp)]


def stage_layers(m: MemoryInputs, *, rank: int) -> list[str]:
    """The attention variants of the layers pipeline rank `rank` holds, its model chunks in order (stage_chunks)."""
    return [v for chunk in stage_chunks(m, rank=rank) for v in chunk]


def _chunk_layers(m: MemoryInputs, *, rank: int) -> tuple[list[list[str]], list[list[str]]]:
    """(kept on the device, offloaded) attention variants of each model chunk's layers. parallel/offload.py offloads
    the first `offload_layers` layers of each model chunk (-1 = all but the last)."""
    chunks = stage_chunks(m, rank=rank)
    if m.offload == "none":
        return chunks, [[] for _ in chunks]
    n_off = [len(c) - 1 if m.offload_layers == -1 else min(m.offload_layers, len(c)) for c in chunks]
    return [c[n:] for c, n in zip(chunks, n_off)], [c[:n] for c, n in zip(chunks, n_off)]


def _stage_layers(m: MemoryInputs, *, rank: int) -> tuple[list[str], list[str]]:
    """(kept on the device, offloaded) attention variants of the stage's layers (_chunk_layers, chunks joined)."""
    mine, off = _chunk_layers(m, rank=rank)
    return [v for c in mine for v in c], [v for c in off for v in c]


def _layer_kept(m: MemoryInputs, variant: str) -> float:
    """Bytes one layer keeps for backward (what it hands to autograd; with offload, what moves to the host)."""
    if m.recompute == "full":  # the checkpoint's input hidden state only
        return m.micro_batch_size * m.model_seq / m.cp / m.tp * m.lm.hidden_size * (2 if m.bf16 else 4)
    return _attention(m, variant, recompute_core=m.recompute == "selective")[0] + _moe(m)[0]


def offloaded_host_bytes(m: MemoryInputs, *, rank: int) -> float:
    """Host memory the offloaded layers' saved tensors take (every in-flight micro-batch's); none in a forward-only
    step, which saves nothing for a backward (the trainer attaches no offload to the indexer step)."""
    if m.forward_only:
        return 0.0
    _, offloaded = _stage_layers(m, rank=rank)
    per_chunk = [sum(_layer_kept(m, v) for v in off) for off in _chunk_layers(m, rank=rank)[1]]
    return sum(n * b for n, b in zip(in_flight_forwards(m, rank=rank, weights=per_chunk), per_chunk))


def offload_layers_in_flight(m: MemoryInputs, *, rank: int) -> int:
    """Offloaded layers whose saved tensors are on the device beside the layers that keep theirs (parallel/offload.py:
    LAYERS_IN_FLIGHT at a time, the layer worked on among them). A chunk's kept layers are its last ones: in forward
    the first of them runs while the offloaded layer before it may still be copied out, in backward the top one runs
    while the next offloaded layer below is prefetched (one beside them); when an offloaded layer is worked on (two
    offloaded layers on the device) the kept layers above it have run their backward and freed theirs. A chunk that
    offloads all its layers holds two of them."""
    mine, offloaded = _stage_layers(m, rank=rank)
    if not offloaded:
        return 0
    return 1 if mine else min(LAYERS_IN_FLIGHT, len(offloaded))


def activation_bytes(m: MemoryInputs, *, rank: int) -> dict[str, float]:
    """Pipeline rank `rank`'s kept activations per layer type (of the layers that stay on the device when
    offloading), each model chunk's times its forwards in flight at the rank's peak (in_flight_forwards), plus the
    largest working set of the phases that are never alive together: a layer's forward or backward buffers (with
    full recompute, on top of the layer re-materialised for its backward), and on the last stage the output layer
    and loss, which run after the last layer's forward and before its backward. The kept activations are alive in
    every phase: at the loss all of them, at the top layer's backward all but what that layer has already consumed
    (tests/unit/test_memory_phases.py profiles the phases on the CPU). Offload (parallel/offload.py) keeps on the
    device one offloaded layer's saved tensors beside the layers that keep theirs (offload_layers_in_flight)."""
    if m.forward_only:
        return _forward_only_bytes(m, rank=rank)
    lm = m.lm
    b = 2 if m.bf16 else 4
    first, last = rank == 0, rank == m.pp - 1
    mine, offloaded = _stage_layers(m, rank=rank)
    all_mine = mine + offloaded
    t_sp = m.micro_batch_size * m.model_seq / m.cp / m.tp
    moe_kept, moe_tr = _moe(m)
    kept_chunks = _chunk_layers(m, rank=rank)[0]
    per_chunk = [sum(_layer_kept(m, v) for v in c) for c in kept_chunks]
    if first:  # the embedding's output, the first layer's input (model chunk 0 of the first rank)
        per_chunk[0] += t_sp * lm.hidden_size * b
    counts = in_flight_forwards(m, rank=rank, weights=per_chunk)
    rows: dict[str, float] = {}
    transient = max(moe_tr, _moe_backward(m))
    per_layer_full = []
    for v in sorted(set(all_mine)):
        a_kept, a_tr = _attention(m, v, recompute_core=m.recompute == "selective")
        n = mine.count(v)
        per_layer_full.append(_attention(m, v, recompute_core=False)[0] + moe_kept)
        transient = max(transient, a_tr)
        if not n:
            continue
        held = sum(c * chunk.count(v) for c, chunk in zip(counts, kept_chunks))  # layers x their forwards in flight
        if m.recompute == "full":
            rows[f"layer inputs ({n} {v} layers, full recompute)"] = held * t_sp * lm.hidden_size * b
        else:
            rows[f"attention {v} x{n}"] = held * a_kept
            rows[f"MoE x{n} ({v} layers)"] = held * moe_kept
    if offloaded:
        rows[f"offload copies in flight (of {len(offloaded)} offloaded layers)"] = (
            offload_layers_in_flight(m, rank=rank) * max(_layer_kept(m, v) for v in set(offloaded)))
    rows["MoE dispatchers' routing maps + indices (every layer)"] = dispatchers_kept_bytes(m, rank=rank)
    if first:
        rows["embedding output + rotary"] = counts[0] * t_sp * lm.hidden_size * b + m.model_seq * lm.head_dim * 4
    # the phases: a layer's buffers (forward, or backward with the gradient arriving from above, [t_sp, h]); under
    # full recompute the backward's on top of the re-materialised layer; the output layer and loss
    buffers = transient + t_sp * lm.hidden_size * b
    phases = ({"recomputed layer + its backward": max(per_layer_full) + buffers} if m.recompute == "full"
              else {"a layer's buffers": buffers})
    if last:
        phases["output layer + loss"] = _loss(m)
    name = max(phases, key=phases.get)
    others = ", ".join(f"{k} {v / GIB:.2f}" for k, v in phases.items() if k != name)
    rows[f"largest phase: {name}" + (f" (not with: {others})" if others else "")] = phases[name]
    return rows


def _forward_only_bytes(m: MemoryInputs, *, rank: int) -> dict[str, float]:
    """The warm-up's indexer-only step (train/trainer.py, `indexer_step`) and train.eval.only: the frozen model runs
    forward only (in the warm-up each DSA layer back-propagates its KL inside its forward), so no layer keeps
    anything for a later backward and no micro-batch's activations wait for one (recompute and offload have nothing
    to do). The peak is one working set: a layer's attention block's tensors (what a training step would keep, here
    alive only until the block ends) with its transient buffers, or its MoE block's, or on the last stage the output
    layer and loss's, whichever is largest, on top of the residual stream (each is freed before the next begins)."""
    b = 2 if m.bf16 else 4
    first, last = rank == 0, rank == m.pp - 1
    t_sp = m.micro_batch_size * m.model_seq / m.cp / m.tp
    mine, _ = _stage_layers(m, rank=rank)
    sets = {f"{v} attention block": sum(_attention(m, v, recompute_core=False)) for v in set(mine)}
    sets["MoE block"] = sum(_moe(m))
    if last:
        sets["output layer + loss"] = _loss(m)
    name = max(sets, key=sets.get)
    rows = {"kept for backward": 0.0, "residual stream": t_sp * m.lm.hidden_size * b,
            f"largest working set, forward only ({name})": sets[name],
            # nothing saves the permutation indices in a forward without autograd: every layer's stay as attributes
            "MoE dispatchers' routing maps + indices (every layer)": (
                sum(map(len, _stage_layers(m, rank=rank))) * dispatcher_bytes(m, offloaded=True))}
    if first:
        rows["rotary"] = m.model_seq * m.lm.head_dim * 4
    return rows


# The ViT's saved-for-backward elements per patch and block: 11 h + 2 mlp + heads + 4 when the frames come in
# more than one size (the blocks join the size groups' attention outputs: h of it; a packed step has several),
# measured on the CPU (tests/unit/test_memory_estimator.py counts them through autograd's saved-tensor hooks);
# counted at 2 bytes (bf16 autocast). On the H200 the ViT kept 30.4 KB per patch and block at the SigLIP-so400m
# sizes (the step with and without parallel.vit.recompute, bench/RESULTS.md), against 42.6 KB counted: an upper
# bound.
def vit_saved_elements(v) -> int:
    return 11 * v.hidden + 2 * v.mlp + v.heads + 4


def _vision_trainable(m: MemoryInputs) -> float:
    """Elements of the vision tower's parameters that train: all of them (trainable=all), the projector's (projector),
    or none."""
    v = m.vision
    if v is None:
        return 0.0
    n_proj = v.projector_params()
    return ((v.num_params() - n_proj if m.trainable == "all" else 0)
            + (n_proj if m.trainable in ("all", "projector") else 0))


def vision_bytes(m: MemoryInputs, *, rank: int) -> dict[str, float]:
    """The vision tower's rows (module docstring) on pipeline rank `rank` (the first: the LM-input stage, which holds
    the embeddings)."""
    v = m.vision
    if v is None:
        return {}
    train_vit = m.trainable == "all"
    train_proj = m.trainable in ("all", "projector")
    n_all = v.num_params()
    n_train = _vision_trainable(m)
    seqs = (m.vit_group or m.num_microbatches) * m.micro_batch_size  # the sequences of one vision phase
    patches = seqs * m.seq_length * v.merge_tokens / m.vit_ranks  # this rank's share of the frames
    rows = {"vision tower weights (fp32, on every rank)": 4.0 * n_all}
    if n_train:
        rows["vision gradients + AdamW (fp32)"] = 12.0 * n_train
    if m.vit_layout == "replicated" and rank > 0:  # a later pipeline stage encodes no frame, receives no embedding
        return rows
    if n_train and m.vit_recompute:
        rows["vision frames kept for the recompute (uint8 pixels)"] = patches * v.patch_dim
    elif train_vit:
        rows["ViT activations kept between its phases"] = patches * (v.depth * vit_saved_elements(v) + v.patch_dim) * 2
    elif train_proj:
        rows["projector activations kept between its phases"] = patches * 4 * v.hidden * 2
    if rank == 0:
        rows["visual embeddings for the LM" + (" + gradients" if n_train else "")] = (
            seqs * m.seq_length / m.cp * v.lm_hidden * 2 * (2 if n_train else 1))
    return rows


def rank_estimate(m: MemoryInputs, *, rank: int) -> MemoryEstimate:
    """Pipeline rank `rank`'s predicted peak: its model state, activations and vision tower rows, or its optimizer
    step's peak where that is higher."""
    rows = {**model_state_bytes(m, rank=rank), **activation_bytes(m, rank=rank), **vision_bytes(m, rank=rank)}
    # the optimizer step's peak, where it is above the forward and backward's (short sequences, few layers)
    over = step_phase_bytes(m, rank=rank) - sum(rows.values())
    if over > 0:
        rows["AdamW step's temporaries, above the forward and backward's peak"] = over
    return MemoryEstimate(rows=rows, stage=rank, host=offloaded_host_bytes(m, rank=rank))


def estimate(m: MemoryInputs) -> MemoryEstimate:
    """The heaviest pipeline rank's predicted peak (`stage` names it; `ranks` holds every rank's total). Every rank is
    evaluated: the first holds the most in-flight micro-batches and the embedding, the last the loss, but a middle
    one can be the heaviest (heavier layers than the first, more in flight than the last)."""
    per_rank = [rank_estimate(m, rank=r) for r in range(m.pp)]
    best = max(per_rank, key=lambda e: e.total)  # the first of equals
    best.ranks = [e.total for e in per_rank]
    return best


def inputs_from_config(cfg, layout) -> MemoryInputs:
    """MemoryInputs of a typed train Config and a validated ParallelLayout."""
    t = cfg.train
    import torch

    bf16 = t.precision == "bf16" or (t.precision == "auto" and torch.cuda.is_available())
    if t.precision == "auto" and not torch.cuda.is_available():
        bf16 = True  # the estimate is for the GPU run the recipe describes
    # train.global_batch_size's micro-batches: the most a step takes (a step of train.batch_rampup takes fewer)
    return MemoryInputs(lm=cfg.model.lm, seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
                        num_microbatches=t.global_batch_size // (t.micro_batch_size * layout.dp), bf16=bf16,
                        tp=layout.tp, pp=layout.pp, vpp=layout.vpp, ep=layout.ep, etp=layout.etp, cp=layout.cp,
                        dp=layout.dp, edp=layout.edp, distributed_optimizer=layout.distributed_optimizer,
                        recompute=layout.recompute, cp_comm=getattr(layout, "cp_comm", "a2a"),
                        offload=getattr(layout, "offload", "none"),
                        offload_layers=getattr(layout, "offload_layers", -1),
                        trainable=t.trained,
                        indexer_step=t.indexer_step,
                        vision=cfg.model.vision.build(cfg.model.lm.hidden_size) if cfg.model.vision.enabled else None,
                        vit_ranks=layout.tp * layout.cp * layout.pp if cfg.parallel.vit.layout == "spread" else 1,
                        vit_layout=cfg.parallel.vit.layout,
                        vit_recompute=cfg.parallel.vit.recompute, vit_group=cfg.parallel.vit.group,
                        deterministic=t.deterministic)
