"""Qwen3-MoE with DeepSeek Sparse Attention (DSA, adapted to grouped-query attention) on some or all of its layers,
for Hugging Face transformers.

`launch/convert.py export` writes this file beside the config.json of a model with DSA layers and names it in the
config's `auto_map`, so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

runs the trained indexers: every query attends to the top-`index_topk` keys its layer's indexer selects, as in
training. Without `trust_remote_code` transformers reads the same directory as the dense Qwen3-MoE model (the
indexer tensors unused), which agrees with it only while every query's causal prefix fits in the top-k.

The file stands alone (torch and transformers only): transformers copies this one file into its module cache.
Written against transformers 5.24 (its Qwen3-MoE classes and its cache's indexer-key layer); also runs on 5.17,
whose cache has no indexer-key layer (see _cached_index_keys).

The computation, per DSA layer (the trainer's models/attention/dsa.py; kernels/dsa/naive.py is its reference):
    q_idx = W_q h                  [b, s, HI, DI]   half-split RoPE
    k_idx = LayerNorm(W_k h)       [b, s, DI]       fp32 norm, no bias; half-split RoPE
    w     = W_w h * HI^-0.5 DI^-0.5                 [b, s, HI]
    I[t, s] = sum_j w[t, j] relu(q_idx[t, j] . k_idx[s])   over the keys query t may see (causal, unpadded, and
              the attention mask's own limits, e.g. packed documents)
    the top-`index_topk` keys by I (larger first; equal scores: the smaller position first), one set per token,
    shared by every query head; each head's softmax runs over its token's selected keys.
The index RoPE uses every other rotary frequency of the main attention (the first index_head_dim / 2 of the even
pairs): with head dim 128 and index dim 64, theta^(-2i/64), plain half-split RoPE at the index width.

Queries run in chunks so their temporaries (the index products [b, chunk, HI, keys] above all) stay within
QUERY_CHUNK_BYTES at long contexts. A chunk scores only the keys up to its last query (none after it is causal);
bf16 index inputs multiply on a GPU's tensor cores into fp32 (index_products); the top-k runs over one int64 key per
score and position, without a sort (top_positions). The attention is one scaled_dot_product_attention call per
chunk (and row, when gathered), in the model's dtype as transformers' own attention, a KV group's query heads folded
into the queries of one head so each key and value serves the group, cuDNN's backend left out. A chunk takes one
of two ways, by the keys its last query sees (DENSE_KEYS_PER_TOPK), so a long prompt's first queries attend densely
and its later ones over gathered keys:
  * densely: over every key up to the chunk's last query, those a query did not select masked by a -inf bias. No
    key is copied; the cost grows with the keys (torch's memory-efficient kernel on a GPU);
  * gathered: over each query's selected keys and values, copied. The cost grows with the top-k.
Both give each query's softmax over its selected keys. It is a reference implementation in plain PyTorch, not a
fast kernel: the trainer's Triton kernels are in kernels/dsa.
Generation keeps each DSA layer's index keys in transformers' cache (its `indexed_attention` layers, which also
reorder them for beam search); on a transformers without them (or a cache built without the config), beside the
cache, where beam search reorders them through the model's _reorder_cache and a cropped cache crops them. A static
cache (preallocated) returns its whole buffer: a layer reads the keys it holds so far, its first ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import cache_utils, masking_utils
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeAttention,
    Qwen3MoeForCausalLM,
    apply_rotary_pos_emb,
)

# Bytes of a chunk's temporaries (its index products, scores, masks, and its attention bias or gathered keys): 1 GiB.
QUERY_CHUNK_BYTES = 1 << 30
# A chunk attends densely (the selection as a bias over every key up to its last query) while the keys its last query
# sees are at most this many times the top-k, over gathered keys beyond: on an H200, with the 30B's shapes, a query
# costs the same both ways near 20 x (about 10 us at 42K keys of a top 2,048), and whole prefills were fastest, or
# within 1% of it, at 16 x among 12, 16, 24 and 32 (bench/probe_dsa_attention.py, bench/RESULTS.md).
DENSE_KEYS_PER_TOPK = 16
# The scaled_dot_product_attention backends the attention may use: not cuDNN's, which builds a graph for each new
# shape (the selected keys' count changes with a call's length until it reaches the top-k).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# transformers' cache layer for index keys (5.24 has it; older versions do not)
INDEXED_CACHE = "indexed_attention" in getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {})


def _cached_index_keys(cache, layer_idx: int, k_idx: torch.Tensor, total: int) -> torch.Tensor:
    """This layer's index keys so far, `k_idx` [b, s, DI] appended: in the cache's indexed-attention layer, or,
    where the cache has none, in a dict beside it (per cache object, so a new generation starts empty). `total`:
    the layer's cached keys after this call's; the dict keeps the first total - s of its own before appending, so
    it follows the cache when that is cropped (assisted decoding). Beam search reorders it through the model's
    _reorder_cache."""
    layer = cache.layers[layer_idx] if hasattr(cache, "layers") and layer_idx < len(cache.layers) else None
    if hasattr(layer, "update_indexer"):
        return cache.update_indexer(k_idx, layer_idx)
    store = cache.__dict__.setdefault("dsa_index_keys", {})
    past = total - k_idx.shape[1]
    kept = store[layer_idx][:, :past] if layer_idx in store else k_idx[:, :0]
    if kept.shape[0] != k_idx.shape[0]:
        raise ValueError(f"layer {layer_idx}: the index keys beside the cache hold a batch of {kept.shape[0]} and this "
                         f"call one of {k_idx.shape[0]} (the cache's rows were changed, e.g. by "
                         "batch_repeat_interleave, which they do not follow): run the prompt for every row, or, with "
                         "transformers 5.2x, build the cache with the model's config "
                         "(DynamicCache(config=model.config)), whose indexer layers follow such edits")
    if kept.shape[1] != past:
        raise ValueError(f"layer {layer_idx}: the cache holds {past} keys but {kept.shape[1]} index keys (it was "
                         "filled by another model): start from an empty cache")
    store[layer_idx] = k_idx = torch.cat([kept, k_idx], dim=1)
    return k_idx


def _rotate_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D], cos/sin broadcastable to [..., D/2]: half-split RoPE, computed in fp32."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    cos, sin = cos.float(), sin.float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Qwen3MoeDSAIndexer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_heads, self.head_dim = int(config.index_n_heads), int(config.index_head_dim)
        self.wq = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, bias=False)  # eps 1e-5, as the trainer's
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def forward(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """hidden [b, s, H]; cos/sin [b, s, head_dim] of the main attention. Returns q [b, s, HI, DI], weights
        [b, s, HI] (fp32) and keys [b, s, DI]."""
        b, s, _ = hidden_states.shape
        half = cos.shape[-1] // 2
        cos_i = cos[..., :half][..., ::2][..., : self.head_dim // 2]  # every other frequency
        sin_i = sin[..., :half][..., ::2][..., : self.head_dim // 2]
        q = self.wq(hidden_states).view(b, s, self.n_heads, self.head_dim)
        k = F.layer_norm(self.wk(hidden_states).float(), (self.head_dim,), self.k_norm.weight.float(), None,
                         self.k_norm.eps).to(hidden_states.dtype)
        w = self.weights_proj(hidden_states).float() * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        q = _rotate_half_split(q, cos_i.unsqueeze(2), sin_i.unsqueeze(2))
        k = _rotate_half_split(k, cos_i, sin_i)
        return q, w, k


def allowed_keys(attention_mask, b: int, s: int, kv: int, i0: int, i1: int, device) -> torch.Tensor:
    """[b, i1 - i0, kv - s + i1] bool: the keys queries i0..i1-1 of the s newest (of kv tokens) may see, among the
    keys up to the last of them (causal, so none after it), and within the attention mask transformers gives the
    layer, if any."""
    past = kv - s
    upto = past + i1
    rows = past + torch.arange(i0, i1, device=device)
    causal = torch.arange(upto, device=device).view(1, 1, upto) <= rows.view(1, -1, 1)
    if attention_mask is None:
        return causal.expand(b, -1, upto)
    m = attention_mask
    if m.dim() == 2:  # [b, kv] padding mask (flash-attention implementations)
        allowed = m[:, None, m.shape[1] - kv:][..., :upto].bool()
    else:  # [b | 1, 1 | heads, s, >= kv], bool (True = may attend) or additive (0 = may attend)
        m = m[:, 0, m.shape[2] - s + i0: m.shape[2] - s + i1, :upto]
        allowed = m if m.dtype == torch.bool else m == 0
    return (causal & allowed).expand(b, -1, upto)


def index_products(q_idx: torch.Tensor, k_idx: torch.Tensor) -> torch.Tensor:
    """[b, c, HI, kv] fp32: q_idx [b, c, HI, DI] . k_idx [b, kv, DI] per index head. In fp32 from the inputs' values:
    on a GPU, bf16 or fp16 inputs multiply on the tensor cores with an fp32 result (each product is exact in fp32,
    as in the fp32 product of their values; the sums run in fp32, in another order)."""
    b, c, hi, di = q_idx.shape
    q2, k2 = q_idx.reshape(b, c * hi, di), k_idx.transpose(1, 2)
    if q2.is_cuda and q2.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.bmm(q2, k2, out_dtype=torch.float32).view(b, c, hi, -1)
        except (TypeError, NotImplementedError):  # a torch without bmm's out_dtype (on this device)
            pass
    return torch.bmm(q2.float(), k2.float()).view(b, c, hi, -1)


# Run eagerly inside a compiled forward (a model its user compiles; generate() no longer compiles this one:
# Qwen3MoeDSAForCausalLM._valid_auto_compile_criteria): inductor's Triton code for the keys below typed their int64
# constant as int32 and failed to build ("Scalar -9223372034707292161 is out of range for type int32", torch 2.11,
# Triton 3.6, H100).
@torch.compiler.disable
def top_positions(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """[..., k]: the positions of the k largest of `scores` [..., n] that `allowed` lets in (the others rank below
    them all, an allowed -inf too), equal scores in position order (-0.0 equal to +0.0, a NaN equal to -inf, as the
    trainer's top-k ranks them), in no particular order. Each allowed score goes with its position into one int64
    key, unique, whose order is that rule's, so top-k needs no sort and no rule for ties."""
    n = scores.shape[-1]
    s = scores.float().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    bits = (s + 0.0).view(torch.int32)  # -0.0 + 0.0 is +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # a float's order as an integer's
    later = 0x7FFFFFFF - torch.arange(n, device=scores.device)  # then the smaller position
    # a position not allowed ranks below every allowed key (-inf's is about -2^63 + 2^55), in position order too: it
    # is chosen only to fill k
    key = torch.where(allowed, ordered * (1 << 32) + later, torch.iinfo(torch.int64).min + later)
    return torch.topk(key, k, dim=-1, sorted=False).indices


def select_keys(q_idx: torch.Tensor, w: torch.Tensor, k_idx: torch.Tensor, allowed: torch.Tensor, topk: int):
    """The indexer's choice for queries q_idx [b, c, HI, DI] (weights w [b, c, HI]) over the first n keys of k_idx
    [b, kv, DI] that `allowed` [b, c, n] lets them see: (positions [b, c, min(topk, n)], valid, the same shape).
    Larger score first, equal scores in position order (top_positions); a query with fewer allowed keys than that
    gets them all, the rest not valid."""
    b, c, hi, _ = q_idx.shape
    n = allowed.shape[-1]
    if n <= topk:  # every allowed key is chosen, whatever its score
        return torch.arange(n, device=allowed.device).expand(b, c, n), allowed
    u = index_products(q_idx, k_idx[:, :n]).relu_()  # [b, c, HI, n]
    scores = torch.bmm(w.float().reshape(b * c, 1, hi), u.view(b * c, hi, n)).view(b, c, n)
    sel = top_positions(scores, allowed, min(topk, n))
    return sel, torch.gather(allowed, -1, sel)


def dense_chunk(budget: int, seen: int) -> int:
    """The most queries (at least 1) a dense chunk may hold when each takes one unit of `budget` per key it sees and
    the chunk's first sees `seen` keys before its own: the c with c * (seen + c) <= budget, its last query's keys
    (seen + c) bounding the chunk's."""
    return max(1, (math.isqrt(seen * seen + 4 * budget) - seen) // 2)


class Qwen3MoeDSAAttention(Qwen3MoeAttention):
    """Qwen3-MoE attention (same projections, q/k RMS norms and RoPE) whose queries see only the keys the indexer
    selects. `query_chunk`: queries per chunk (None: from QUERY_CHUNK_BYTES); `attend_densely`: True or False
    for one way of attending (None: by DENSE_KEYS_PER_TOPK)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.indexer = Qwen3MoeDSAIndexer(config)
        self.index_topk = int(config.index_topk)
        self.query_chunk: int | None = None
        self.attend_densely: bool | None = None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        b, s, _ = hidden_states.shape
        shape = (b, s, -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)  # [b, hq, s, d]
        k = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)  # [b, hkv, s, d]
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q_idx, w_idx, k_idx = self.indexer(hidden_states, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            # the keys cached so far: a static cache returns its whole buffer, of which they are the first
            filled = int(cache.get_seq_length(self.layer_idx))
            k, v = k[:, :, :filled], v[:, :, :filled]
            k_idx = _cached_index_keys(cache, self.layer_idx, k_idx, filled)[:, :filled]
        out = self._sparse_attention(q, k, v, q_idx, w_idx, k_idx, attention_mask)
        return self.o_proj(out.reshape(b, s, -1)), None

    def _sparse_attention(self, q, k, v, q_idx, w_idx, k_idx, attention_mask):
        """q [b, hq, s, d], k/v [b, hkv, kv, d], the index inputs, the layer's attention mask -> [b, s, hq, d]."""
        b, hq, s, d = q.shape
        hkv, kv = k.shape[1], k.shape[2]
        g, esz = hq // hkv, q.element_size()
        topk = min(self.index_topk, kv)
        # the queries [0, switch) attend densely: those that see at most DENSE_KEYS_PER_TOPK x the top-k keys (query i
        # sees kv - s + i + 1), unless a way is forced
        forced = self.attend_densely
        switch = (s if forced else 0) if forced is not None else min(s, max(0, DENSE_KEYS_PER_TOPK * topk - kv + s))
        # bytes of a chunk's temporaries, each part within half of QUERY_CHUNK_BYTES: the selection's per query and key
        # (the fp32 index products per index head, the scores, the top-k's int64 keys, the allowed keys), the
        # attention's per query and key when dense (the bias, a KV group's g query heads and its unexpanded rows, the
        # kept keys), per query when gathered (each selected key and value, the bias, the positions)
        half = QUERY_CHUNK_BYTES // (2 * b)
        select, dense_attend = 4 * self.indexer.n_heads + 25, esz * (g + 1) + 1
        gathered_chunk = max(1, half // ((2 * hkv * d * esz + esz + 9) * topk))
        out = q.new_empty(b, s, hq, d)
        i0 = 0
        while i0 < s:
            dense = i0 < switch
            chunk = self.query_chunk or (dense_chunk(half // dense_attend, kv - s + i0) if dense else gathered_chunk)
            i1 = min(switch if dense else s, i0 + chunk)
            n = kv - s + i1  # the keys up to the chunk's last query
            sub = max(1, half // (select * n))
            picks = []  # the selection in pieces of `sub` queries, each over the keys up to its own last query
            for j0 in range(i0, i1, sub):
                j1 = min(i1, j0 + sub)
                allowed = allowed_keys(attention_mask, b, s, kv, j0, j1, q.device)
                sel, valid = select_keys(q_idx[:, j0:j1], w_idx[:, j0:j1], k_idx, allowed, topk)
                short = min(topk, n) - sel.shape[-1]  # a piece with fewer keys than the top-k takes them all
                picks.append((F.pad(sel, (0, short)), F.pad(valid, (0, short))) if short else (sel, valid))
            sel, valid = (torch.cat(x, dim=1) if len(picks) > 1 else x[0] for x in zip(*picks))  # [b, c, <= topk]
            none = ~valid.any(-1)  # [b, c] a query with no key to see (a padding token's): zeros (torch's kernels
            # give zeros or NaN, by version and backend)
            qc = q[:, :, i0:i1]
            o = self._attend_densely(qc, k, v, sel, valid, n) if dense else self._attend_gathered(qc, k, v, sel, valid)
            out[:, i0:i1] = o.masked_fill(none[..., None, None], 0.0)
            i0 = i1
        return out

    def _attend_densely(self, q, k, v, sel, valid, n: int):
        """Queries q [b, hq, c, d] over the first n keys (those up to their last), the keys not selected masked by a
        -inf bias: one attention call, a KV group's g query heads folded into the queries of one head (so each key
        and value serves the group). No key or value is copied; the cost is dense attention's over n keys.
        -> [b, c, hq, d]"""
        b, hq, c, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        # the selected keys kept; a position not valid (a piece's padding may repeat a selected one) goes to an extra
        # column, cut off
        keep = torch.zeros((b, c, n + 1), dtype=torch.bool, device=q.device).scatter_(
            -1, sel.masked_fill(~valid, n), True)[..., :n]
        # the bias's rows repeated for the g heads; its row length padded to 16 elements, as the memory-efficient
        # kernel wants its rows aligned
        bias = q.new_empty(b, g, c, -(-n // 16) * 16)
        bias[..., :n] = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill_(~keep, float("-inf"))[
            :, None]
        with sdpa_kernel(SDPA_BACKENDS):
            o = F.scaled_dot_product_attention(q.reshape(b, hkv, g * c, d), k[:, :, :n], v[:, :, :n],
                                               attn_mask=bias.view(b, 1, g * c, -1)[..., :n], scale=self.scaling)
        return o.view(b, hkv, g, c, d).permute(0, 3, 1, 2, 4).reshape(b, c, hq, d)

    def _attend_gathered(self, q, k, v, sel, valid):
        """Queries q [b, hq, c, d] over their selected keys, gathered: one attention call per row, the queries as the
        batch and a KV group's g query heads as g queries of one head (so each gathered key and value serves the
        group). The cost grows with the top-k, not with the keys. -> [b, c, hq, d]"""
        b, hq, c, d = q.shape
        hkv, m = k.shape[1], sel.shape[-1]
        g = hq // hkv
        bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
        qc = q.reshape(b, hkv, g, c, d).permute(0, 3, 1, 2, 4)  # [b, c, hkv, g, d]
        out = q.new_empty(b, c, hq, d)
        for r in range(b):  # the keys gathered as rows of the cache (index_select copies whole rows of head_dim)
            kg, vg = (x[r].index_select(1, sel[r].flatten()).view(hkv, c, m, d).transpose(0, 1) for x in (k, v))
            with sdpa_kernel(SDPA_BACKENDS):
                o = F.scaled_dot_product_attention(qc[r], kg, vg, attn_mask=bias[r].view(c, 1, 1, m),
                                                   scale=self.scaling)  # [c, hkv, g, d]
            out[r] = o.reshape(c, hq, d)
        return out


class Qwen3MoeDSAForCausalLM(Qwen3MoeForCausalLM):
    """Qwen3-MoE whose layers in `config.dsa_layers` use DSA attention (with their indexers' weights under
    model.layers.{l}.self_attn.indexer.{wq,wk,k_norm,weights_proj})."""

    def __init__(self, config):
        layers = [int(l) for l in (getattr(config, "dsa_layers", None) or [])]
        if not layers:
            raise ValueError("config.dsa_layers names no layer: this is a dense Qwen3-MoE checkpoint "
                             "(load it with Qwen3MoeForCausalLM)")
        bad = [l for l in layers if not 0 <= l < config.num_hidden_layers]
        if bad:
            raise ValueError(f"config.dsa_layers={layers}: layers {bad} are not in 0..{config.num_hidden_layers - 1}")
        if INDEXED_CACHE:  # the cache keeps the index keys of these layers (transformers' indexed-attention layers)
            config.layer_types = ["indexed_attention" if l in layers else "full_attention"
                                  for l in range(config.num_hidden_layers)]
        super().__init__(config)
        for l in layers:
            self.model.layers[l].self_attn = Qwen3MoeDSAAttention(config, l)

    def _valid_auto_compile_criteria(self, *args, **kwargs) -> bool:
        """generate() runs this model's forward as it is, never compiled for it: transformers compiles the forward
        (CUDA graphs) on a GPU whenever the cache is preallocated (cache_implementation="static"), and compiled, the
        index keys kept from one step to the next came out wrong on an H100 (torch 2.11): with transformers 5.17 an
        error ("accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run", in
        _cached_index_keys), with 5.24 other tokens than generation without a cache (a third alike); run as it is,
        the static cache gave those tokens exactly on both. A model compiled by its user meets the same limits."""
        return False

    def create_masks_for_generate(self, *args, **kwargs):
        """generate()'s mask for a cache it compiles for (a static one): transformers' masks, one per layer type of
        the config, of which the DSA layers' (a causal mask, never skipped) serves every layer, as Qwen3-MoE's model
        takes one mask."""
        masks = masking_utils.create_masks_for_generate(*args, **kwargs)
        return masks.get("indexed_attention", masks.get("full_attention")) if isinstance(masks, dict) else masks

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search's reordering of the cache (transformers calls this where a model defines it): the cache's own
        layers, and the index keys kept beside a cache that has no indexed-attention layers."""
        cache.reorder_cache(beam_idx)
        store = getattr(cache, "dsa_index_keys", {})
        for l, keys in store.items():
            store[l] = keys.index_select(0, beam_idx.to(keys.device))
        return cache
