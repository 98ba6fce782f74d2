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
cached column's index in its row's interleaved sequence (-1 at a hole), on the device, and `cache.ksa_held` each
row's count of them; a cache without them holds rows without holes. A padded batch's first call (nothing cached)
runs each row alone and merges their caches, so the prompts' padding costs no compute. Each call's layout is
planned on the host (numpy) and sent to the device in one copy. Queries run in chunks (QUERY_CHUNK_ELEMENTS) so the
attention logits stay bounded at long contexts. It is a reference implementation in plain PyTorch, not a fast
kernel: the trainer's Triton kernels are in kernels/ksa.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeAttention,
    Qwen3MoeForCausalLM,
    Qwen3MoeModel,
    apply_rotary_pos_emb,
)

# Elements of the largest per-chunk temporary (fp32 attention logits): 2^26 = 256 MiB.
QUERY_CHUNK_ELEMENTS = 1 << 26
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


class Qwen3MoeKSAAttention(Qwen3MoeAttention):
    """Qwen3-MoE attention with a second q/k/v projection for summary tokens, attending by the KSA rule.
    `layout`, set by Qwen3MoeKSAForCausalLM around each forward: (summary [b, t] bool, True at the call's summary
    tokens; rows [b, t] and keys [b, cached + t], each column's index in its row's interleaved sequence, -1 at a
    hole); `query_chunk`: queries per chunk (None: from QUERY_CHUNK_ELEMENTS)."""

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
        self.layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.query_chunk: int | None = None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        if self.layout is None:
            raise RuntimeError("a KSA layer runs inside Qwen3MoeKSAForCausalLM (it sets where the summary tokens are)")
        summary_at, rows, keys = self.layout
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
        g = hq // hkv
        chunk = self.query_chunk or max(1, min(t, QUERY_CHUNK_ELEMENTS // (b * hq * total)))
        kf, vf = k.float(), v.float()
        out = q.new_empty(b, t, hq, d)
        for i0 in range(0, t, chunk):
            i1 = min(t, i0 + chunk)
            qc = q[:, :, i0:i1].float().reshape(b, hkv, g, i1 - i0, d)
            logits = torch.einsum("bhgqd,bhkd->bhgqk", qc, kf) * self.scaling
            mask = ksa_mask(rows[:, i0:i1], keys, chunk=self.chunk, num_summary=self.num_summary, window=self.window)
            p = torch.softmax(logits.masked_fill(~mask[:, None, None], float("-inf")), dim=-1)  # a query sees itself
            o = torch.einsum("bhgqk,bhkd->bqhgd", p, vf)
            out[:, i0:i1] = o.reshape(b, i1 - i0, hq, d).to(q.dtype)
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
        for l in layers:
            self.model.layers[l].self_attn = Qwen3MoeKSAAttention(config, l)

    def _reorder_cache(self, cache, beam_idx: torch.LongTensor):
        """Beam search's reordering of the cache (transformers calls this where a model defines it): its keys and
        values, and the rows' layouts (`cache.ksa_own`, `cache.ksa_held`)."""
        cache.reorder_cache(beam_idx)
        own = getattr(cache, "ksa_own", None)
        if own is not None:
            cache.ksa_own = own[beam_idx.to(own.device)]
            cache.ksa_held = [cache.ksa_held[i] for i in beam_idx.tolist()]
        return cache

    @staticmethod
    def _cached_layout(cache, b: int, device) -> tuple[torch.Tensor, list[int]]:
        """([b, cached columns] on the device: each cached column's index in its row's interleaved sequence, -1 at a
        hole; each row's interleaved tokens in the cache)."""
        n = 0 if cache is None else cache.get_seq_length()
        own = None if cache is None else getattr(cache, "ksa_own", None)
        if own is None:  # a cache of rows without holes (filled without padding, or by an older version of this file)
            return torch.arange(n, device=device).expand(b, n), [n] * b
        if own.shape[0] != b:
            raise ValueError(f"the cache holds a batch of {own.shape[0]} row{'s' * (own.shape[0] != 1)} and this call "
                             f"one of {b} (its rows' layouts do not follow batch_repeat_interleave or "
                             "batch_select_indices): run the prompt for every row")
        if own.shape[1] < n:
            raise ValueError(f"the cache holds {n} tokens and its layout {own.shape[1]}: it was changed by other code "
                             "than this model's")
        if own.shape[1] > n:  # a cropped cache keeps its first n columns
            own = own[:, :n]
            return own, (own >= 0).sum(1).tolist()
        return own, list(cache.ksa_held)

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
        b, t = input_ids.shape
        dev = input_ids.device
        # the call's mask and positions on the host, in one copy: the layout is planned there
        host = [attention_mask[:, -t:].long()] if attention_mask is not None else []
        host += [position_ids[:, -t:].long()] if position_ids is not None else []
        host = torch.stack([x.to(dev) for x in host]).cpu().numpy() if host else None
        real = host[0].astype(bool) if attention_mask is not None else np.ones((b, t), dtype=bool)
        pos_given = host[-1] if position_ids is not None else None
        past, held = self._cached_layout(cache, b, dev)
        kept = kept_positions(t, logits_to_keep).numpy()
        if past.shape[1] == 0 and b > 1 and not real.all():
            return self._rows_alone(input_ids, real, pos_given, labels, cache, kept)
        plan, column, held = self._plan(real, pos_given, held, t, kept)
        sent = torch.from_numpy(np.concatenate([plan.ravel(), column.ravel()])).to(dev)  # one copy to the device
        width = plan.shape[2]
        src, pos, own, is_summary = sent[:4 * b * width].view(4, b, width)
        at = sent[4 * b * width:].view(b, -1)
        keys = torch.cat([past, own], dim=1)
        text = self.model.embed_tokens(input_ids)
        table = torch.cat([text.flatten(0, 1), self.model.summary_embed.weight.to(text.dtype),
                           text.new_zeros(1, text.shape[-1])])
        hidden = table[src]  # text tokens, summary embeddings, zeros at holes
        attn = [self.model.layers[l].self_attn for l in self.ksa_layers]
        for m in attn:
            m.layout = (is_summary.bool(), own, keys)
        try:
            # an explicit mask (holes out): without one transformers reads a position that repeats (a summary's) as
            # the start of another packed sequence and splits a dense layer's causal mask there
            out = self.model(inputs_embeds=hidden, position_ids=pos, use_cache=use_cache,
                             attention_mask=(keys >= 0).long(), **{CACHE_KEY: cache})
        finally:
            for m in attn:
                m.layout = None
        if cache is not None:
            cache.ksa_own, cache.ksa_held = keys, held
        last = out.last_hidden_state.gather(1, at.clamp(min=0).unsqueeze(-1).expand(-1, -1, text.shape[-1]))
        logits = self.lm_head(last).masked_fill((at < 0).unsqueeze(-1), 0.0)  # padding: zero logits
        loss = (self.loss_function(logits=logits, labels=labels, vocab_size=cfg.vocab_size)
                if labels is not None else None)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_KEY: getattr(out, CACHE_KEY) if use_cache else None})

    def _plan(self, real: np.ndarray, pos_given: np.ndarray | None, held: list[int], t: int, kept: np.ndarray):
        """The call's layout, planned on the host: ([4, b, width]: each column's source row in [input tokens,
        summary embeddings, a zero row], its position, its index in its row's interleaved sequence (-1 at a hole),
        whether it is a summary; [b, kept]: the column of each kept input token, -1 at padding; each row's
        interleaved tokens after the call). Each row's new tokens (its unmasked ones, in order) follow its cached
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
        return plan, column[:, kept], [h + n for h, (*_, n) in zip(held, rows)]

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
            cache.ksa_own, cache.ksa_held = own.to(dev), sizes
        loss = (self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
                if labels is not None else None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KEY: cache})
