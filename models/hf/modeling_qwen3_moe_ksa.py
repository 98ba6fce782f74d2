"""Qwen3-MoE with Kwai Summary Attention (KSA) on some or all of its layers, for Hugging Face transformers.

`launch/convert.py export` writes this file beside the config.json of a model with KSA layers and names it in the
config's `auto_map`, so

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

runs the model as it was trained: summary tokens inserted into the sequence, each KSA layer attending by its rule.
transformers' own Qwen3-MoE cannot read such a directory (the summary tensors and the changed sequence).

The file stands alone (torch and transformers only): transformers copies this one file into its module cache.
Written against transformers 5.24 (its Qwen3-MoE classes).

The computation (the trainer's models/ksa_tokens.py, models/attention/ksa.py; kernels/ksa/naive.py is its reference):
  * the text of a row is cut into chunks of C = `ksa_chunk` tokens; after every complete chunk come S =
    `ksa_num_summary` summary tokens, embedded from `model.summary_embed` (row j for the chunk's j-th summary);
    a summary token takes the position of its chunk's last text token;
  * every layer runs on that interleaved sequence. A KSA layer projects summary tokens with its own
    `summary_{q,k,v}_proj` (the q/k norms are shared) and attends by the KSA rule with its window W =
    ksa_windows[layer % len(ksa_windows)]: a summary query of chunk c sees chunk c's text and summaries
    (causally); a text query of chunk c sees the text of chunks c-W..c (its own causally) and the summaries of the
    chunks before c-W. A dense layer of the same model attends causally over the whole interleaved sequence;
  * the logits are those of the text tokens: [batch, text tokens, vocab], aligned with input_ids.
Each row is one document. With a cache (transformers' DynamicCache, as generate() makes), the cache holds the
interleaved sequence's keys and values: a call with the next text tokens appends them, and after a token that
completes a chunk its S summary tokens in the same call, so generation runs one new token per step (1 + S rows
where a chunk completes). A padded batch (zeros in attention_mask: left padding, right padding, anywhere) runs as one
batch: a row's document is its unmasked tokens in order, so its chunks, and so its summaries, start at its first
token. The rows' interleaved sequences then differ in length, and each call's are left-aligned by holes: a hole is a
column that no query of its row sees (it is masked like padding). `cache.ksa_own` [rows, cached columns] keeps each
cached column's index in its row's interleaved sequence (-1 at a hole), on the device, and `cache.ksa_columns` (on
the host) the column of each row's indices; a cache without them holds rows without holes. A padded batch's first
call (nothing cached) runs each row alone and merges their caches, so the prompts' padding costs no compute. Each
call's layout is planned on the host (numpy) and sent to the device in one copy. Assisted decoding crops the cache by
the text tokens it rejects: while it runs, the cache's crop counts text tokens (their summaries go with them).
A KSA layer's queries run in blocks, and a block attends over the keys it may see alone (key_blocks): the summaries
of the chunks before its window's, then its window's and its own columns; the mask picks each query's among those.
So a query's cost grows with the summaries (one chunk's S in C + S tokens) and the window, not with every key. A
block is one call of torch's scaled_dot_product_attention: a KV group's query heads run as the queries of one head
(each gathered key and value serves them all), with the mask as an additive bias whose elements (the group's heads
x queries x columns) stay within QUERY_CHUNK_ELEMENTS (but for a block of BLOCK_UNIT queries, past about a million
tokens). It is a reference implementation in plain PyTorch, not a fast kernel: the trainer's Triton kernels are in
kernels/ksa.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeAttention,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    apply_rotary_pos_emb,
)

# Elements of the largest per-block temporary (the attention bias of a KV group's query heads): 2^26 (128 MiB bf16).
QUERY_CHUNK_ELEMENTS = 1 << 26
# The scaled_dot_product_attention backends a block may use: not cuDNN's, which builds a graph for each new shape
# (a block's columns change from block to block and from one generated token to the next).
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Queries of the units a call's queries are grouped from into blocks (key_blocks).
BLOCK_UNIT = 64
# The cache's keyword and output field: `cache` from transformers 5.2x, `past_key_values` before (5.17).
CACHE_KEY = "cache" if "cache" in inspect.signature(Qwen3MoeModel.forward).parameters else "past_key_values"


def summary_layout(num_text: int, chunk: int, num_summary: int, device=None, start: int = 0) -> dict[str, torch.Tensor]:
    """Where text and summary tokens go in the interleaved sequence of one document, for its `num_text` text tokens
    from text index `start` on (the summaries of the chunks they complete follow them): text_index [T],
    summary_index [N], slot [N] (0..S-1), source [N] (the chunk's last text token, among the T). Indices count from
    the interleaved position of text token `start` (0 for a whole document)."""
    return {k: torch.from_numpy(v).to(device) for k, v in _layout(num_text, chunk, num_summary, start).items()}


def _layout(num_text: int, chunk: int, num_summary: int, start: int = 0) -> dict[str, np.ndarray]:
    """summary_layout's arrays in numpy (int64): a forward plans its layout on the host, a few microseconds an op."""
    first, end = start // chunk, (start + num_text) // chunk  # the chunks these tokens complete: first..end-1
    origin = start + first * num_summary
    i = np.arange(start, start + num_text, dtype=np.int64)
    c = np.repeat(np.arange(first, end, dtype=np.int64), num_summary)
    slot = np.tile(np.arange(num_summary, dtype=np.int64), end - first)
    return {"text_index": i + (i // chunk) * num_summary - origin,
            "summary_index": c * (chunk + num_summary) + chunk + slot - origin,
            "slot": slot, "source": c * chunk + chunk - 1 - start}


def cached_text_tokens(cached: int, chunk: int, num_summary: int) -> int:
    """The text tokens of an interleaved sequence of `cached` tokens that ends after a text token or a chunk's last
    summary (as every call leaves a cache)."""
    period = chunk + num_summary
    if cached % period >= chunk:
        raise ValueError(f"the cache holds {cached} tokens, which ends among a chunk's summaries "
                         f"(chunks of {chunk} + {num_summary} summaries): it was not filled by this model")
    return cached - num_summary * (cached // period)


def kept_positions(t: int, logits_to_keep: int | torch.Tensor, device=None) -> torch.Tensor:
    """The positions among t tokens whose logits a forward keeps, by transformers' `logits_to_keep` convention: an
    int k > 0 the last k, 0 all, a 1-D tensor the positions it names."""
    every = torch.arange(t, device=device)
    return every[-logits_to_keep:] if isinstance(logits_to_keep, int) else every[logits_to_keep.to(every.device)]


def ksa_mask(rows: torch.Tensor, keys: int | torch.Tensor, *, chunk: int, num_summary: int,
             window: int) -> torch.Tensor:
    """[..., len(rows), len(keys)] bool: which keys the queries may see (the KSA rule). `rows` [..., q] and `keys`
    [..., k] are indices in the interleaved sequence, -1 at a hole; `keys` an int n stands for 0..n-1. A hole key is
    seen by no query; a hole query sees every key (its output is never read, and a row of -inf would make NaN)."""
    period = chunk + num_summary
    if isinstance(keys, int):
        keys = torch.arange(keys, device=rows.device)
    q, k = rows.unsqueeze(-1), keys.unsqueeze(-2)
    cq, ck = q // period, k // period
    q_sum, k_sum = (q % period) >= chunk, (k % period) >= chunk
    summary_query = q_sum & (ck == cq)
    text_query = ~q_sum & ((~k_sum & (ck >= cq - window)) | (k_sum & (ck < cq - window)))
    return ((k >= 0) & (k <= q) & (summary_query | text_query)) | (q < 0)


def key_blocks(rows: np.ndarray, columns: list[np.ndarray], total: int, *, chunk: int, num_summary: int, window: int,
               heads: int, block: int | None = None, elements: int = QUERY_CHUNK_ELEMENTS,
               unit: int = BLOCK_UNIT) -> dict:
    """Which key columns each block of a call's queries may see, so a KSA layer attends over those alone (its far
    context is the summaries, not every key). `rows` [b, t]: the call's queries' indices in their row's interleaved
    sequence (-1 at a hole), in the last t of `total` columns; `columns[r]`: the column of each of row r's indices
    0, 1, ... (a row's indices grow along its columns, holes between them).

    A block of queries [i0, i1) sees, per row r, (far) the row's first far[r] summaries, those of the chunks before
    the near range, and (near) the columns near[r]..end-1, end = total - t + i1 (the column after the block's last
    query). The near range starts at the first token of chunk c - window, c the least chunk of the row's queries in
    the block; the KSA mask (ksa_mask) then picks each query's keys among those. The two parts do not overlap (a key
    counted twice would weigh twice in the softmax) and together hold every key a query of the block may see: the
    chunks before c - window are complete, with their summaries, in every row. Blocks are `block` queries each, or,
    with `block` None, as many as keep a block's bias within `elements` (heads x queries x rows x columns, `heads`
    a KV group's query heads), from units of `unit` queries; one unit may exceed it (with 8 heads, chunks of 8 with
    1 summary and a window of 1024 chunks, past about a million tokens). The work is O(rows x (queries +
    summaries)): the cached columns are not scanned.

    Returns {"blocks": [(i0, i1, far width, near width)], "near": [b, blocks], "far": [b, blocks] int64}; the far
    summaries' columns are summary_columns', shared by every window's plan."""
    b, t = rows.shape
    past, period = total - t, chunk + num_summary
    unit = block or min(t, unit)
    n = -(-t // unit)
    none = 1 << 40  # a chunk past every query's: a row with no query in a unit sees nothing there
    cq = np.full((b, n * unit), none, dtype=np.int64)
    cq[:, :t] = np.where(rows >= 0, rows // period, none)
    first = cq.reshape(b, n, unit).min(-1)  # [b, n]: the least chunk of a row's queries in each unit
    end = past + np.minimum(np.arange(1, n + 1) * unit, t)  # [n]
    some = first < none
    lead = np.where(some, np.maximum(first - window, 0), 0)  # the near range's first chunk
    far = np.where(some, lead * num_summary, none)  # every chunk before it has its summaries
    near = np.full((b, n), none, dtype=np.int64)  # `none`: a row with no query in the unit
    for r in range(b):
        near[r, some[r]] = columns[r][lead[r, some[r]] * period]

    def widths(near_at, far_at, stop):  # a block's far and near widths: those of its rows with queries
        some = near_at < none
        return int(np.where(some, far_at, 0).max()), int(np.where(some, stop - near_at, 0).max())

    # units into blocks: a block's near start and far count per row are the least of its units' (from the same
    # unit, the row's first with a query: both grow with the units)
    blocks, near_b, far_b = [], [], []
    j = 0
    while j < n:
        lo_near, lo_far, k = near[:, j], far[:, j], j + 1
        while block is None and k < n:
            grown_near, grown_far = np.minimum(lo_near, near[:, k]), np.minimum(lo_far, far[:, k])
            if (min(t, (k + 1) * unit) - j * unit) * b * heads * sum(widths(grown_near, grown_far, end[k])) > elements:
                break
            lo_near, lo_far, k = grown_near, grown_far, k + 1
        i0, i1 = j * unit, min(t, k * unit)
        blocks.append((i0, i1, *widths(lo_near, lo_far, past + i1)))
        near_b.append(np.minimum(lo_near, past + i1))  # a row with no query in the block: an empty near range
        far_b.append(np.where(lo_near < none, lo_far, 0))
        j = k
    return {"blocks": blocks, "near": np.stack(near_b, axis=1), "far": np.stack(far_b, axis=1)}


def summary_columns(columns: list[np.ndarray], count: int, *, chunk: int, num_summary: int) -> np.ndarray:
    """[b, count]: the columns of each row's first `count` summaries, in order (0 past a row's own); `columns[r]`:
    the column of each of row r's indices (key_blocks)."""
    index = np.arange(count, dtype=np.int64)
    index = (index // num_summary) * (chunk + num_summary) + chunk + index % num_summary  # the j-th's index
    out = np.zeros((len(columns), count), dtype=np.int64)
    for r, cols in enumerate(columns):
        mine = index[index < cols.size]
        out[r, :mine.size] = cols[mine]
    return out


def block_keys(plan: dict, n: int, rows: torch.Tensor, keys: torch.Tensor, *, group: int, dtype: torch.dtype,
               **rule) -> tuple[torch.Tensor, torch.Tensor]:
    """Block n of a key_blocks plan (its arrays on the device, with "summaries": summary_columns' on the device),
    on the device: ([b, columns] the key columns it gathers, [b, 1, group x queries, columns] the attention bias of
    a KV group's `group` query heads over them, each head's queries in turn: 0 where a query sees the column (ksa_mask
    by `rule`), -inf elsewhere and at a column not in the row's set). `rows`, `keys`: the call's queries' and keys'
    indices. A one-block plan (a generation step) keeps them for the layers that share it."""
    if n in plan.setdefault("kept", {}):
        return plan["kept"][n]
    i0, i1, far, near = plan["blocks"][n]
    dev, end = keys.device, keys.shape[1] - rows.shape[1] + i1  # the column after the block's last query
    # its far summaries (the first `far` of each row's, fewer in some rows), then its near range (from each row's
    # start to the column after the block's last query)
    near_cols = plan["near"][:, n:n + 1] + torch.arange(near, device=dev)
    seen = torch.cat([torch.arange(far, device=dev) < plan["far"][:, n:n + 1], near_cols < end], dim=1)
    cols = torch.cat([plan["summaries"][:, :far], near_cols.clamp(max=keys.shape[1] - 1)], dim=1)
    mask = ksa_mask(rows[:, i0:i1], keys.gather(1, cols).masked_fill(~seen, -1), **rule)  # a query sees itself
    bias = torch.zeros(mask.shape, dtype=dtype, device=dev).masked_fill_(~mask, float("-inf"))
    b, nq, width = mask.shape
    found = cols, bias[:, None, None].expand(b, 1, group, nq, width).reshape(b, 1, group * nq, width)
    if len(plan["blocks"]) == 1:
        plan["kept"][n] = found
    return found


class Qwen3MoeKSAAttention(Qwen3MoeAttention):
    """Qwen3-MoE attention with a second q/k/v projection for summary tokens, attending by the KSA rule.
    `layout`, set by Qwen3MoeKSAForCausalLM around each forward: (summary [b, t] bool, True at the call's summary
    tokens; rows [b, t] and keys [b, cached + t], each column's index in its row's interleaved sequence, -1 at a
    hole; blocks: {window: key_blocks' plan, its arrays on the device}). Each block of queries attends over the
    key columns its plan gathers (its far summaries and its near range), not over every key."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        h, d = config.hidden_size, self.head_dim
        bias = config.attention_bias
        self.summary_q_proj = nn.Linear(h, config.num_attention_heads * d, bias=bias)
        self.summary_k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=bias)
        self.summary_v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=bias)
        self.chunk, self.num_summary = int(config.ksa_chunk), int(config.ksa_num_summary)
        windows = list(config.ksa_windows)
        self.window = int(windows[layer_idx % len(windows)])
        self.layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict] | None = None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if self.layout is None:
            raise RuntimeError("a KSA layer runs inside Qwen3MoeKSAForCausalLM (it sets where the summary tokens are)")
        summary_at, rows, keys, blocks = self.layout
        b, t, _ = hidden_states.shape
        summary = summary_at.view(b, t, 1)

        def project(text, summ):  # each token's row from its own projection
            return torch.where(summary, summ(hidden_states), text(hidden_states)).view(b, t, -1, self.head_dim)

        q = self.q_norm(project(self.q_proj, self.summary_q_proj)).transpose(1, 2)  # [b, hq, t, d]
        k = self.k_norm(project(self.k_proj, self.summary_k_proj)).transpose(1, 2)  # [b, hkv, t, d]
        v = project(self.v_proj, self.summary_v_proj).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        hq, hkv, d, total = q.shape[1], k.shape[1], q.shape[3], k.shape[2]
        if keys.shape != (b, total):
            raise RuntimeError(f"layer {self.layer_idx}: the layout names {keys.shape[1]} keys, the cache holds "
                               f"{total}")
        g, plan = hq // hkv, blocks[self.window]
        out = q.new_empty(b, t, hq, d)
        for n, (i0, i1, _, _) in enumerate(plan["blocks"]):
            cols, bias = block_keys(plan, n, rows, keys, group=g, dtype=q.dtype, chunk=self.chunk,
                                    num_summary=self.num_summary, window=self.window)
            at = cols[:, None, :, None].expand(-1, hkv, -1, d)
            # a KV group's g query heads as g x nq queries of one head: each gathered key and value serves them all
            nq = i1 - i0
            with sdpa_kernel(SDPA_BACKENDS):
                o = F.scaled_dot_product_attention(q[:, :, i0:i1].reshape(b, hkv, g * nq, d), k.gather(2, at),
                                                   v.gather(2, at), attn_mask=bias, scale=self.scaling)
            out[:, i0:i1] = o.view(b, hkv, g, nq, d).permute(0, 3, 1, 2, 4).reshape(b, nq, hq, d)
        return self.o_proj(out.reshape(b, t, -1)), None


class Qwen3MoeKSAForCausalLM(Qwen3MoeForCausalLM):
    """Qwen3-MoE whose layers in `config.ksa_layers` use KSA (their summary projections under
    model.layers.{l}.self_attn.summary_{q,k,v}_proj), with the summary embeddings under model.summary_embed."""

    def __init__(self, config):
        layers = [int(l) for l in (getattr(config, "ksa_layers", None) or [])]
        if not layers:
            raise ValueError("config.ksa_layers names no layer: this is not a KSA checkpoint")
        bad = [l for l in layers if not 0 <= l < config.num_hidden_layers]
        if bad:
            raise ValueError(f"config.ksa_layers={layers}: layers {bad} are not in 0..{config.num_hidden_layers - 1}")
        super().__init__(config)
        self.model.summary_embed = nn.Embedding(int(config.ksa_num_summary), config.hidden_size)
        self.ksa_layers = layers
        self.query_block: int | None = None  # queries per block of a KSA layer (None: key_blocks sizes them)
        for l in layers:
            self.model.layers[l].self_attn = Qwen3MoeKSAAttention(config, l)

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search's reordering of the cache (transformers calls this where a model defines it): its keys and
        values, and the rows' layouts (`cache.ksa_own`, `cache.ksa_columns`)."""
        cache.reorder_cache(beam_idx)
        own = getattr(cache, "ksa_own", None)
        if own is not None:
            columns = self._cached_layout(cache, own.shape[0], own.device)[1]
            cache.ksa_columns = [columns[i] for i in beam_idx.tolist()]
            cache.ksa_own = own[beam_idx.to(own.device)]
        return cache

    def _assisted_decoding(self, input_ids, *args, **model_kwargs):
        """transformers' assisted decoding (prompt lookup, an assistant model) crops the cache by the candidate tokens
        it rejects, counted in text tokens, while the cache holds the interleaved sequence: meanwhile the cache's crop
        counts text tokens, and the summaries of the chunks that the rejected tokens completed go with them."""
        cache = model_kwargs.get(CACHE_KEY)
        if not isinstance(cache, DynamicCache):
            return super()._assisted_decoding(input_ids, *args, **model_kwargs)
        crop = type(cache).crop
        cache.crop = lambda max_length: crop(cache, self._text_crop(cache, max_length))
        try:
            return super()._assisted_decoding(input_ids, *args, **model_kwargs)
        finally:
            del cache.crop

    def _text_crop(self, cache, max_length: int) -> int:
        """The columns' crop (<= 0: minus the cached columns to drop) for a crop counted in text tokens (max_length
        <= 0 drops -max_length from the end, as transformers 5.2x crops; > 0 keeps that many): the cache keeps the
        text tokens kept and the summaries of the chunks they complete. One row (as assisted decoding runs)."""
        own = getattr(cache, "ksa_own", None)
        if own is not None and own.shape[0] != 1:
            raise ValueError(f"a crop counted in text tokens takes a cache of one row, and this one holds "
                             f"{own.shape[0]}")
        chunk, num_summary = int(self.config.ksa_chunk), int(self.config.ksa_num_summary)
        columns = self._cached_layout(cache, 1, None if own is None else own.device)[1][0]
        text = cached_text_tokens(columns.size, chunk, num_summary)
        keep = max(0, text + max_length) if max_length <= 0 else min(max_length, text)
        seq = keep + (keep // chunk) * num_summary  # its interleaved tokens
        return (int(columns[seq - 1]) + 1 if seq else 0) - cache.get_seq_length()

    @staticmethod
    def _cached_layout(cache, b: int, device) -> tuple[torch.Tensor, list[np.ndarray]]:
        """([b, cached columns] on the device: each cached column's index in its row's interleaved sequence, -1 at a
        hole; per row, on the host, the column of each of its indices, as many as its interleaved tokens cached)."""
        n = 0 if cache is None else cache.get_seq_length()
        own = None if cache is None else getattr(cache, "ksa_own", None)
        if own is None:  # a cache of rows without holes (filled without padding, or by an older version of this file)
            return torch.arange(n, device=device).expand(b, n), [np.arange(n, dtype=np.int64)] * b
        if own.shape[0] != b:
            raise ValueError(f"the cache holds a batch of {own.shape[0]} row{'s' * (own.shape[0] != 1)} and this call "
                             f"one of {b} (its rows' layouts do not follow batch_repeat_interleave or "
                             "batch_select_indices): run the prompt for every row")
        if own.shape[1] < n:
            raise ValueError(f"the cache holds {n} tokens and its layout {own.shape[1]}: it was changed by other code "
                             "than this model's")
        columns = getattr(cache, "ksa_columns", None)
        if columns is None:  # set by an older version of this file: one copy
            columns = cache.ksa_columns = [np.flatnonzero(row >= 0) for row in own.cpu().numpy()]
        if own.shape[1] > n:  # a cropped cache keeps its first n columns
            own, columns = own[:, :n], [c[c < n] for c in columns]
        return own, columns

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None, past_key_values=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """The logits of the text tokens `input_ids` [b, t]: a whole document per row, or with a cache the tokens
        that follow those it holds. `attention_mask` ([b, t], or [b, cached + t] as generate() passes it; its last
        t columns are read) leaves padding out of the rows' documents; padding gets zero logits. Positions:
        `position_ids`, else the tokens' places in their row's document. `logits_to_keep`, as in transformers'
        models: an int k > 0 keeps the logits of the last k tokens (generate() passes 1, so a long prompt's prefill
        does not build [t, vocab] logits), 0 all of them, a 1-D tensor those at its indices."""
        cache = cache if cache is not None else past_key_values
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("a KSA model takes input_ids (it inserts its summary tokens between their embeddings)")
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=cfg)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(f"a KSA model's cache grows by the summary tokens it inserts between the text's, and "
                             f"this one ({type(cache).__name__}) is preallocated (as generate()'s "
                             "cache_implementation='static' makes one, sized for the text): use a DynamicCache, "
                             "generate()'s default")
        b, t = input_ids.shape
        dev = input_ids.device
        # the call's mask and positions on the host, in one copy: the layout is planned there
        host = [attention_mask[:, -t:].long()] if attention_mask is not None else []
        host += [position_ids[:, -t:].long()] if position_ids is not None else []
        host = torch.stack([x.to(dev) for x in host]).cpu().numpy() if host else None
        real = host[0].astype(bool) if attention_mask is not None else np.ones((b, t), dtype=bool)
        pos_given = host[-1] if position_ids is not None else None
        past, columns = self._cached_layout(cache, b, dev)
        kept = kept_positions(t, logits_to_keep).numpy()
        if past.shape[1] == 0 and b > 1 and not real.all():
            return self._rows_alone(input_ids, real, pos_given, labels, cache, kept)
        plan, column = self._plan(real, pos_given, [c.size for c in columns], t, kept)
        cached = past.shape[1]  # each row's new indices follow its cached ones, in its new columns
        columns = [np.concatenate([c, cached + np.flatnonzero(new >= 0)]) for c, new in zip(columns, plan[2])]
        attn = [self.model.layers[l].self_attn for l in self.ksa_layers]
        group = cfg.num_attention_heads // cfg.num_key_value_heads  # a KV group's query heads: a block's bias
        blocks = {w: key_blocks(plan[2], columns, cached + plan.shape[2], chunk=int(cfg.ksa_chunk),
                                num_summary=int(cfg.ksa_num_summary), window=w, heads=group,
                                block=self.query_block)
                  for w in sorted({m.window for m in attn})}
        most = max(f for x in blocks.values() for _, _, f, _ in x["blocks"])  # far summaries, for every window
        summaries = summary_columns(columns, most, chunk=int(cfg.ksa_chunk), num_summary=int(cfg.ksa_num_summary))
        arrays = [plan, column, summaries] + [x[k] for x in blocks.values() for k in ("near", "far")]
        sent = torch.from_numpy(np.concatenate([x.ravel() for x in arrays])).to(dev)  # one copy to the device
        sent = [x.view(a.shape) for x, a in zip(sent.split([a.size for a in arrays]), arrays)]
        (src, pos, own, is_summary), at = sent[0], sent[1]
        for n, x in enumerate(blocks.values()):
            x.update(near=sent[3 + 2 * n], far=sent[4 + 2 * n], summaries=sent[2])
        keys = torch.cat([past, own], dim=1)
        text = self.model.embed_tokens(input_ids)
        table = torch.cat([text.flatten(0, 1), self.model.summary_embed.weight.to(text.dtype),
                           text.new_zeros(1, text.shape[-1])])
        hidden = table[src]  # text tokens, summary embeddings, zeros at holes
        for m in attn:
            m.layout = (is_summary.bool(), own, keys, blocks)
        try:
            # an explicit mask (holes out): without one transformers reads a position that repeats (a summary's) as
            # the start of another packed sequence and splits a dense layer's causal mask there
            out = self.model(inputs_embeds=hidden, position_ids=pos, use_cache=use_cache,
                             attention_mask=(keys >= 0).long(), **{CACHE_KEY: cache})
        finally:
            for m in attn:
                m.layout = None
        if cache is not None:
            cache.ksa_own, cache.ksa_columns = keys, columns
        last = out.last_hidden_state.gather(1, at.clamp(min=0).unsqueeze(-1).expand(-1, -1, text.shape[-1]))
        logits = self.lm_head(last).masked_fill((at < 0).unsqueeze(-1), 0.0)  # padding: zero logits
        loss = (self.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size)
                if labels is not None else None)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_KEY: getattr(out, CACHE_KEY) if use_cache else None})

    def _plan(self, real: np.ndarray, pos_given: np.ndarray | None, held: list[int], t: int, kept: np.ndarray):
        """The call's layout, planned on the host: ([4, b, width]: each column's source row in [input tokens,
        summary embeddings, a zero row], its position, its index in its row's interleaved sequence (-1 at a hole),
        whether it is a summary; [b, kept]: the column of each kept input token, -1 at padding), `held` being each
        row's interleaved tokens in the cache. Each row's new tokens (its unmasked ones, in order) follow its cached
        ones; the rows' new columns are left-aligned by holes."""
        chunk, num_summary = int(self.config.ksa_chunk), int(self.config.ksa_num_summary)
        b = real.shape[0]
        rows = []
        for r in range(b):
            where = np.flatnonzero(real[r])
            start = cached_text_tokens(held[r], chunk, num_summary)
            lay = _layout(where.size, chunk, num_summary, start)
            rows.append((where, start, lay, where.size + lay["slot"].size))
        width = max(n for *_, n in rows)
        if width == 0:
            raise ValueError("attention_mask leaves out every token of this call")
        plan = np.zeros((4, b, width), dtype=np.int64)
        src, pos, own, is_summary = plan
        src.fill(b * t + num_summary)  # the zero row
        own.fill(-1)
        column = np.full((b, t), -1, dtype=np.int64)
        for r, (where, start, lay, n) in enumerate(rows):
            ti, si = lay["text_index"] + (width - n), lay["summary_index"] + (width - n)
            src[r, ti], src[r, si] = r * t + where, b * t + lay["slot"]
            own[r, width - n:] = np.arange(held[r], held[r] + n)
            p = pos_given[r][where] if pos_given is not None else np.arange(start, start + where.size)
            pos[r, ti], pos[r, si] = p, p[lay["source"]]
            is_summary[r, si] = 1
            column[r, where] = ti
        return plan, column[:, kept]

    def _rows_alone(self, input_ids, real, pos_given, labels, cache, kept) -> CausalLMOutputWithPast:
        """A padded batch's first call (nothing cached): each row's tokens run alone, so its padding costs no
        compute; with a cache, the rows' caches then go into the batch's one, left-aligned by holes, as a later
        call lays out its rows."""
        b, t = input_ids.shape
        dev = input_ids.device
        rows = []
        for r in range(b):
            where = np.flatnonzero(real[r])
            if where.size == 0:  # a row of padding only: holes
                rows.append((None, None, None))
                continue
            mine = real[r][kept]
            own_cache = DynamicCache(config=self.config) if cache is not None else None
            index = torch.from_numpy(where).to(dev)
            out = self(input_ids=input_ids[r:r + 1, index], use_cache=cache is not None, cache=own_cache,
                       position_ids=None if pos_given is None else torch.from_numpy(pos_given[r:r + 1, where]).to(dev),
                       logits_to_keep=torch.from_numpy(np.cumsum(real[r]) - 1)[kept[mine]])
            rows.append((mine, out.logits[0], own_cache))
        if all(x is None for _, x, _ in rows):
            raise ValueError("attention_mask leaves out every token of this call")
        like = next(x for _, x, _ in rows if x is not None)
        logits = like.new_zeros(b, kept.size, like.shape[-1])
        for r, (mine, x, _) in enumerate(rows):
            if x is not None:
                logits[r, torch.from_numpy(mine).to(dev)] = x
        if cache is not None:
            sizes = [0 if c is None else c.get_seq_length() for *_, c in rows]
            width = max(sizes)
            for layer in range(self.config.num_hidden_layers):
                batch = []
                for kind in ("keys", "values"):
                    some = next(getattr(c.layers[layer], kind) for *_, c in rows if c is not None)
                    merged = some.new_zeros(b, some.shape[1], width, some.shape[3])
                    for r, (*_, c) in enumerate(rows):
                        if c is not None:
                            merged[r, :, width - sizes[r]:] = getattr(c.layers[layer], kind)[0]
                    batch.append(merged)
                cache.update(*batch, layer)
            own = torch.full((b, width), -1, dtype=torch.long)
            for r, n in enumerate(sizes):
                own[r, width - n:] = torch.arange(n)
            cache.ksa_own, cache.ksa_columns = own.to(dev), [width - n + np.arange(n) for n in sizes]
        loss = (self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
                if labels is not None else None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: cache})
