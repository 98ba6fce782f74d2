"""DeepSeek Sparse Attention adapted to GQA (DSA) for the language model's attention slot.

Per layer an indexer scores keys for every query,
    q_idx = W_q h            [b, s, HI, DI]   (RoPE, non-interleaved)
    k_idx = LayerNorm(W_k h) [b, s, DI]       (one shared index key per token, fp32 norm, RoPE)
    w     = W_w h * HI^-0.5 * DI^-0.5         [b, s, HI]
    I[t, s] = sum_j w[t, j] relu(q_idx[t, j] . k_idx[s]),
and the attention of every query head uses only the top-k keys of its token (kernels/dsa).
Stages (`model.lm.dsa.stage`):
  dense_warmup  attention stays dense (SDPA); the indexer learns KL(p || softmax(I)) over all causal
                keys, p = the main attention summed over heads and L1-normalised (detached). Train it
                with `train.trainable=indexer` so the rest of the model stays frozen.
  sparse        attention over the selected top-k only; KL restricted to the selected set.
                total = LM + loss_weight * KL.
                When no document is longer than top-k, every token selects its whole causal prefix:
                the sparse attention is then dense attention and the KL over the selected set is the
                KL over all eligible keys, so that case runs the dense kernels (the warm-up stage's
                computation; no selection, union plan or gathers) with the same result.
In both stages the indexer's input is detached, so the LM loss never reaches the indexer and the
indexer loss never reaches the model. A packed row's padding (document -1, given by the trainer) trains no
indexer: its rows of w are zeroed (`without_padding_rows`). The padding at the row's end is cut off before the
attention (dense.documents_part): no selection, attention or KL of it is computed, and the KL's value is the mean
over the documents' tokens.

How the KL's gradient reaches the indexer (`DSACoreAttention.kl_backward`):
  "attach"  the KL rides on the attention output's gradient (AttachLossFn), so it arrives during the
            model's backward, under any pipeline schedule. The default. In the sparse stage (one rank, or
            context parallelism's Triton path) the attention's own backward delivers it (`kl_in_attention_backward`, kernels/dsa/fused.py):
            it sums the probabilities it recomputes into the KL's target, so the loss has no forward of
            its own and keeps nothing until the backward; `last_kl` then holds its value once the
            backward has run (the trainer reads it after the step).
  "local"   the layer back-propagates its KL at once, in its forward, and returns the attention
            output without it (so a frozen model's output needs no gradient). When nothing but the
            indexers trains (the warm-up), the step can then skip the backward through the frozen
            model (train/trainer.py), whose gradients reach no trainable parameter; the indexers get
            the same gradients.

The indexer RoPE uses the even rotary pairs of the main attention's rotary frequencies: with head dim
128 and index dim 64 these are exactly theta^(-2i/64), i < 32, i.e. standard half-split RoPE at the
index dimension (and, for video tokens, the same time/height/width split at half the width).

Tensor parallelism: indexer weights are replicated. Each TP rank builds its target p from its own
query heads; since KL is linear in p and p = mean over ranks of the per-rank head averages, each rank
attaches loss_weight / tp * KL_r and the indexer weights are tagged `sequence_parallel`, which makes
megatron sum their gradients over the TP group: the sum is the gradient of the full-head loss.

Context parallelism (the CP group of `pg_collection` has > 1 rank): the indexer runs on the rank's
tokens with the rank's slice of the rotary embedding (megatron's MultimodalRotaryEmbedding slices it per
CP rank, so the index RoPE uses each token's global position); the injected `cp_ops.dsa`
(models/attention/cp.py; parallel/context implements it) gathers the small index keys, selects top-k of
the local queries over all keys with the GLOBAL cu_seqlens, attends over all-gathered K/V and returns
the KL as the mean over the rank's tokens, so the attached `kl * b * s_local` is this rank's share of the
global per-token sum (CP gradients are summed over the DP x CP group and divided by the global token
count, as for the LM loss). The row's trailing padding ends each rank's share (the trainer names the rank's part,
dense.local_documents): `cp_ops.dsa` selects, attends and takes the KL for the rank's other tokens only, and
s_local counts those.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule

from kernels.dsa import dsa_attention, indexer_kl_loss, indexer_kl_loss_backward_now
from kernels.dsa.fused import AttachLossFn
from models.attention.cp import ContextParallelOps, cp_ops_for, resolve_cp_comm
from models.attention.dense import (causal_attention, documents_part, local_documents, longest_document, padding_tail,
                                    with_padding_rows)
from models.attention.layer_axis import on_variant_axis

STAGES = ("dense_warmup", "sparse")


def _rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Half-split (non-interleaved) RoPE; x [b, s, ..., d], freqs [b, s, 1.., d/2]."""
    d = x.shape[-1] // 2
    cos, sin = freqs.cos(), freqs.sin()
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class DSAIndexer(MegatronModule):
    """`place`: this layer's place on its checkpoint tensors' layer axis when only some layers have DSA
    (models/attention/layer_axis.py); None keeps megatron's."""

    def __init__(self, config, *, heads: int, dim: int, place: tuple[int, int] | None = None):
        super().__init__(config=config)
        h = config.hidden_size
        self.heads, self.dim, self.place = heads, dim, place
        self.wq = torch.nn.Linear(h, heads * dim, bias=False, dtype=config.params_dtype)
        self.wk = torch.nn.Linear(h, dim, bias=False, dtype=config.params_dtype)
        self.ww = torch.nn.Linear(h, heads, bias=False, dtype=config.params_dtype)
        # computed in fp32 (forward); the weight is stored in the model's dtype like every other parameter, its fp32
        # master copy kept by the optimizer: megatron-core 0.16.1's distributed optimizer cannot checkpoint an fp32
        # parameter in a bf16 model (train/optim.check_param_dtypes)
        self.k_norm = torch.nn.LayerNorm(dim, bias=False, dtype=config.params_dtype)
        for p in self.parameters():  # replicated over TP; gradients summed over TP (see module docstring)
            p.sequence_parallel = config.tensor_model_parallel_size > 1

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        return super().sharded_state_dict(prefix, on_variant_axis(sharded_offsets, self.place), metadata)

    def forward(self, hidden_bsh: torch.Tensor, freqs_bs1f: torch.Tensor):
        b, s, _ = hidden_bsh.shape
        q = self.wq(hidden_bsh).view(b, s, self.heads, self.dim)
        k = F.layer_norm(self.wk(hidden_bsh).float(), (self.dim,), self.k_norm.weight.float(), None,
                         self.k_norm.eps).to(hidden_bsh.dtype)
        w = self.ww(hidden_bsh) * (self.heads ** -0.5 * self.dim ** -0.5)
        q = _rotate(q, freqs_bs1f)
        k = _rotate(k, freqs_bs1f[:, :, 0])
        return q, w, k


class DSASelfAttention(SelfAttention):
    def __init__(self, config, submodules, layer_number: int, attn_mask_type=None, cp_comm_type=None,
                 pg_collection=None, index_heads: int = 16, index_dim: int = 64,
                 indexer_place: tuple[int, int] | None = None, **unused):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if index_dim * 2 > config.kv_channels or index_dim % 2:
            raise ValueError(f"model.lm.dsa.index_dim ({index_dim}) must be even and at most half the head dim "
                             f"({config.kv_channels}): its RoPE uses every other rotary pair, on its two halves")
        self.indexer = DSAIndexer(config, heads=index_heads, dim=index_dim, place=indexer_place)
        if self.checkpoint_core_attention:
            # megatron's selective recompute re-runs the core attention in backward, after forward() has
            # cleared the indexer output it reads; DSA's core attention is therefore never checkpointed
            # (parallel/memory.py counts its activations as kept).
            warnings.warn("parallel.recompute=selective does not recompute DSA core attention (its indexer "
                          "output is not a checkpoint input); the rest of the layer follows the setting")
            self.checkpoint_core_attention = False

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if rotary_pos_emb is None:
            raise ValueError("DSA needs rotary position embeddings (the model's RoPE)")
        emb = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb  # [s, b, 1, D]
        half = emb.shape[-1] // 2
        freqs = emb[..., :half][..., ::2][..., : self.indexer.dim // 2]  # even pairs -> [s, b, 1, DI/2]
        h = hidden_states.detach()  # the indexer loss never reaches the model (module docstring)
        if self.config.sequence_parallel:  # the indexer scores every key: it needs the whole sequence
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=False, group=self.pg_collection.tp)
        self.core_attention.indexer_out = self.indexer(h.transpose(0, 1), freqs.transpose(0, 1))
        try:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
        finally:
            self.core_attention.indexer_out = None


class DSACoreAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, topk: int = 2048,
                 stage: str = "sparse", loss_weight: float = 1.0, backend: str = "auto",
                 cp_ops: ContextParallelOps | None = None):
        super().__init__(config=config)
        self.cp_group, self.cp_ops = cp_ops_for(config, pg_collection, cp_ops)
        tp_ = config.tensor_model_parallel_size
        # only the dense warm-up's attention uses it (sparse attention all-gathers K/V regardless)
        self.cp_comm = resolve_cp_comm(cp_comm_type if stage == "dense_warmup" else "all_gather",
                                       num_q_heads=config.num_attention_heads // tp_,
                                       num_kv_heads=config.num_query_groups // tp_,
                                       cp_size=config.context_parallel_size, cp_ops=self.cp_ops)
        if stage not in STAGES:
            raise ValueError(f"model.lm.dsa.stage must be one of {STAGES}, got {stage!r}")
        self.topk, self.stage, self.loss_weight, self.backend = topk, stage, loss_weight, backend
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.tp = config.tensor_model_parallel_size
        self.indexer_out = None
        self.kl_backward = "attach"  # or "local" (module docstring; use_local_kl_backward)
        # no KL in a training forward without autograd (forward); False computes it anyway, the baseline that
        # bench/bench_dsa_stage.py measures this against
        self.skip_kl_without_grad = True
        # sparse stage: the KL's target from the attention backward (dsa_attention(kl_in_backward), and under CP
        # cp_ops.dsa's); False runs the loss forward apart (bench/bench_dsa_stage.py's baseline)
        self.kl_in_attention_backward = True
        # with record_kls (the trainer sets it), every KL this layer computes is kept, with the number of tokens it is
        # the mean over, until its reader takes them (take_kls): one per micro-batch, so a step or an evaluation
        # reports their mean over every token, not the last micro-batch's. A sparse stage's KL is filled in by the
        # backward, so the values are read after it. Off by default, so a caller that never takes them (a benchmark,
        # inference) does not collect them.
        self.record_kls = False
        self.kls: list[tuple[torch.Tensor, int]] = []

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if self.indexer_out is None:
            raise RuntimeError("DSACoreAttention must be called from DSASelfAttention (no indexer output)")
        q_idx, w, k_idx = self.indexer_out
        s, b, nq, d = query.shape
        w = without_padding_rows(w, packed_seq_params)
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        if self.cp_group is None:  # the row without its trailing padding (dense.documents_part); b == 1 there
            n, cu = documents_part(s, packed_seq_params)
            query, key, value = query[:n], key[:n], value[:n]
            q_idx, w, k_idx = q_idx[:, :n], w[:, :n], k_idx[:, :n]
        else:  # cp_ops.dsa leaves out the rank's share of the row's trailing padding, and weighs its KL by the rest
            n = local_documents(s, packed_seq_params, context_parallel=True)
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, n, h, d]
        backend = self.backend if self.backend != "auto" else ("triton" if q.is_cuda else "naive")
        longest = None if self.cp_group is not None else longest_document(s, packed_seq_params)
        now = self.kl_backward == "local" and self.training and torch.is_grad_enabled()
        # Training without autograd is the first pass of a full activation recompute (parallel.recompute=full,
        # with or without parallel.offload): its KL could train nothing and the recompute computes it again with its
        # graph, so it is skipped (bench/RESULTS.md: the loss forward, 45-60 ms per layer and step at 128K).
        with_kl = not (self.skip_kl_without_grad and self.training and not torch.is_grad_enabled())
        # sparse stage with autograd: the KL rides on the attention's backward, which also computes its target
        # (kernels/dsa/fused.py); its value is there after the backward
        in_bwd = (self.stage == "sparse" and self.kl_in_attention_backward and with_kl and not now and self.training
                  and torch.is_grad_enabled())
        if self.cp_group is not None:  # s = this rank's tokens; cu = global boundaries
            out, kl = self.cp_ops.dsa(query, key, value, q_idx, w, k_idx, cp_group=self.cp_group, topk=self.topk,
                                      stage="sparse" if self.stage == "sparse" else "dense", scale=self.scale,
                                      cu_seqlens=cu, backend=backend, dense_cp_comm=self.cp_comm,
                                      kl_grad=self._kl_grad(b, n) if now else None, with_kl=with_kl,
                                      kl_in_backward=self._kl_grad(b, n) if in_bwd else None,
                                      pad_tail=padding_tail(packed_seq_params), local_tail=s - n)
            out = out.transpose(0, 1)  # [b, s, h, d] like the single-rank path below
        elif self.stage == "sparse" and longest > self.topk:
            # selection, attention and KL sharing one union plan
            out, kl, _ = dsa_attention(q.contiguous(), k.contiguous(), v.contiguous(), q_idx, w, k_idx,
                                       topk=self.topk, scale=self.scale, cu_seqlens=cu, backend=backend,
                                       with_loss=with_kl, kl_in_backward=self._kl_grad(b, n) if in_bwd else None)
        else:  # the dense warm-up, or a sparse stage whose top-k selects every causal key (module docstring)
            out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cu, self.scale,
                                   max_seqlen=longest).transpose(1, 2)
            if not with_kl:
                kl = None
            elif now:  # its backward at once (module docstring)
                kl = indexer_kl_loss_backward_now(q, k, q_idx, w, k_idx, grad=self._kl_grad(b, n), scale=self.scale,
                                                  cu_seqlens=cu, backend=backend)
            else:
                kl = indexer_kl_loss(q, k, q_idx, w, k_idx, stage="dense", scale=self.scale, cu_seqlens=cu,
                                     backend=backend)
        if kl is None:  # last_kl keeps the value of the last pass that computed it
            return with_padding_rows(out.transpose(0, 1), s, 0).reshape(s, b, nq * d)
        if self.training and torch.is_grad_enabled() and kl.requires_grad:
            if self.kl_backward == "local":
                (kl * self._kl_grad(b, n)).backward()
            else:
                out = AttachLossFn.apply(out, kl, self._kl_grad(b, n))
        self.last_kl = kl.detach()
        if self.record_kls:
            self.kls.append((self.last_kl, b * n))
        return with_padding_rows(out.transpose(0, 1), s, 0).reshape(s, b, nq * d)

    def take_kls(self) -> list[tuple[torch.Tensor, int]]:
        """The KLs computed since the last call (a value per forward that computed one), each with the tokens it is
        the mean over (the rows the layer attended on this rank: without a row's trailing padding), and forget
        them."""
        kls, self.kls = self.kls, []
        return kls

    def _kl_grad(self, b: int, s: int) -> float:
        """d(total)/d(KL): per-token loss convention, the trainer divides every gradient by the global token
        count; each TP rank's KL uses its own heads (module docstring)."""
        return self.loss_weight * b * s / self.tp


def without_padding_rows(w: torch.Tensor, packed_seq_params) -> torch.Tensor:
    """The indexer's head weights w [b, s, index heads] with the rows of a packed row's padding zeroed: the tokens
    whose document is -1 in `packed_seq_params.documents` (the trainer's PackedSeqDocuments, [b, s] as this rank's
    attention sees the row: a video pack's padding segment, a KSA row's, a token file's document data.exclude
    blanks). Such a query's index scores are then 0, so its KL term gives no gradient to w (the product with 0),
    q_idx or k_idx (each is scaled by w): padding trains no indexer, where it was 30% of the tiny recipe's packed
    tokens. A padding query still selects keys (all tied: the kernels' order for ties) within its own document, so
    no real token's selection, attention or KL changes. The padding at a row's end (dense.documents_part) is not
    attended at all and is in no KL; a padding segment before a document's (a token file's blanked document) still
    has its KL (against a uniform choice) in the logged mean."""
    docs = getattr(packed_seq_params, "documents", None)
    if docs is None:
        return w
    if tuple(docs.shape) != tuple(w.shape[:2]):
        raise ValueError(f"the documents of a packed row cover {tuple(docs.shape)} tokens [b, s]; the indexer has "
                         f"{tuple(w.shape[:2])}")
    return w * (docs >= 0).to(device=w.device, dtype=w.dtype).unsqueeze(-1)


def record_kls(modules) -> list:
    """Makes every DSA core attention under `modules` (model chunks) keep each KL it computes until take_kls;
    returns those layers."""
    cores = [m for chunk in modules for m in chunk.modules() if isinstance(m, DSACoreAttention)]
    for m in cores:
        m.record_kls = True
    return cores


def use_local_kl_backward(modules) -> int:
    """Switches every DSA core attention under `modules` (model chunks) to kl_backward="local" (module
    docstring); returns how many there are."""
    cores = [m for chunk in modules for m in chunk.modules() if isinstance(m, DSACoreAttention)]
    for m in cores:
        m.kl_backward = "local"
    return len(cores)
