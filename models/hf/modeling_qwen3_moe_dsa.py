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

Queries run in chunks (QUERY_CHUNK_ELEMENTS) so the index products [b, chunk, HI, keys] and the gathered keys and
values [b, chunk, top-k, kv heads, head dim] stay bounded at long contexts. A chunk scores only the keys up to its
last query (none after it is causal); bf16 index inputs multiply on a GPU's tensor cores into fp32 (index_products);
the top-k runs over one int64 key per score and position, without a sort (top_positions); the attention is one
scaled_dot_product_attention call per chunk and row, its queries as the batch and a KV group's query heads as one
head's queries (in the model's dtype, as transformers' own attention). It is a reference implementation in plain
PyTorch, not a fast kernel: the trainer's Triton kernels are in kernels/dsa.
Generation keeps each DSA layer's index keys in transformers' cache (its `indexed_attention` layers, which also
reorder them for beam search); on a transformers without them (or a cache built without the config), beside the
cache, where beam search reorders them through the model's _reorder_cache and a cropped cache crops them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import cache_utils
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeAttention,
    Qwen3MoeForCausalLM,
    apply_rotary_pos_emb,
)

# Elements of the largest per-chunk temporary (the fp32 index products): 2^26 = 256 MiB.
QUERY_CHUNK_ELEMENTS = 1 << 26
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


def top_positions(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """[..., k]: the positions of the k largest of `scores` [..., n] that `allowed` lets in (the others rank below
    them all), equal scores in position order (-0.0 equal to +0.0), in no particular order. Each score goes with its
    position into one int64 key, unique, whose order is that rule's, so top-k needs no sort and no rule for ties."""
    n = scores.shape[-1]
    bits = (scores.float().masked_fill(~allowed, float("-inf")) + 0.0).view(torch.int32)  # -0.0 + 0.0 is +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # a float's order as an integer's
    key = ordered * (1 << 32) + (0x7FFFFFFF - torch.arange(n, device=scores.device))  # then the smaller position
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


class Qwen3MoeDSAAttention(Qwen3MoeAttention):
    """Qwen3-MoE attention (same projections, q/k RMS norms and RoPE) whose queries see only the keys the indexer
    selects. `query_chunk`: queries per chunk (None: from QUERY_CHUNK_ELEMENTS)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.indexer = Qwen3MoeDSAIndexer(config)
        self.index_topk = int(config.index_topk)
        self.query_chunk: int | None = None

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
            k_idx = _cached_index_keys(cache, self.layer_idx, k_idx, k.shape[2])
        out = self._sparse_attention(q, k, v, q_idx, w_idx, k_idx, attention_mask)
        return self.o_proj(out.reshape(b, s, -1)), None

    def _sparse_attention(self, q, k, v, q_idx, w_idx, k_idx, attention_mask):
        """q [b, hq, s, d], k/v [b, hkv, kv, d], the index inputs, the layer's attention mask -> [b, s, hq, d]."""
        b, hq, s, d = q.shape
        hkv, kv = k.shape[1], k.shape[2]
        g = hq // hkv
        topk = min(self.index_topk, kv)
        # the largest temporaries per query: index products per head, gathered keys and values, the scores' keys
        per_query = max(self.indexer.n_heads * kv, 2 * topk * hkv * d, 2 * kv)
        chunk = self.query_chunk or max(1, min(s, QUERY_CHUNK_ELEMENTS // (b * per_query)))
        out = q.new_empty(b, s, hq, d)
        for i0 in range(0, s, chunk):
            i1 = min(s, i0 + chunk)
            c = i1 - i0
            allowed = allowed_keys(attention_mask, b, s, kv, i0, i1, q.device)  # [b, c, keys up to the last query]
            sel, valid = select_keys(q_idx[:, i0:i1], w_idx[:, i0:i1], k_idx, allowed, topk)
            n = sel.shape[-1]
            bias = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill_(~valid, float("-inf"))
            none = ~valid.any(-1, keepdim=True)  # a query with no key to see (a padding token's): zeros (torch's
            # kernels give zeros or NaN, by version and backend)
            qc = q[:, :, i0:i1].view(b, hkv, g, c, d).permute(0, 3, 1, 2, 4)  # [b, c, hkv, g, d]
            for r in range(b):
                # one attention per query over its own keys: the queries as the batch, a KV group's g query heads as
                # g queries of one head, so each gathered key and value serves the group; the keys gathered as
                # rows of the cache (index_select copies whole rows of head_dim)
                kg, vg = (x[r].index_select(1, sel[r].flatten()).view(hkv, c, n, d).transpose(0, 1) for x in (k, v))
                with sdpa_kernel(SDPA_BACKENDS):
                    o = F.scaled_dot_product_attention(qc[r], kg, vg, attn_mask=bias[r].view(c, 1, 1, n),
                                                       scale=self.scaling)  # [c, hkv, g, d]
                out[r, i0:i1] = o.reshape(c, hq, d).masked_fill(none[r].unsqueeze(-1), 0.0)
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

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search's reordering of the cache (transformers calls this where a model defines it): the cache's own
        layers, and the index keys kept beside a cache that has no indexed-attention layers."""
        cache.reorder_cache(beam_idx)
        store = getattr(cache, "dsa_index_keys", {})
        for l, keys in store.items():
            store[l] = keys.index_select(0, beam_idx.to(keys.device))
        return cache
