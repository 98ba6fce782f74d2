"""transformers' code for a KSA model (models/hf/modeling_qwen3_moe_ksa.py, written beside a KSA export).

Its logits against our model are checked in test_hf_qwen3_moe.py (test_ksa_import_export_round_trip) and at TP2/EP2
in tests/dist/test_hf_roundtrip.py. Here: its summary layout and mask against models/ksa_tokens.py and
kernels/ksa/naive.py (the trainer's), and what inference needs beyond one forward: a cache that gives the whole
forward's logits a few tokens at a time, generation with it, padded batches.
"""

import copy
import inspect

import numpy as np
import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from kernels.ksa import naive
from models.hf.modeling_qwen3_moe_ksa import (
    Qwen3MoeKSAAttention,
    cached_text_tokens,
    key_blocks,
    ksa_mask,
    summary_columns,
    summary_layout,
)
from models.hf.verify import LOGIT_ATOL, LOGIT_RTOL
from models.ksa_tokens import build_summary_layout

# the keyword (and output field) of a cache: `cache` from transformers 5.2x (the pinned 5.24), `past_key_values`
# before (5.17)
CACHE = "cache" if "cache" in inspect.signature(Qwen3MoeForCausalLM.forward).parameters else "past_key_values"


@pytest.mark.parametrize("chunk, num_summary", [(1, 1), (4, 2), (5, 1)])
def test_layout_and_mask_are_the_trainers(chunk, num_summary):
    """The summary positions, slots and sources equal models/ksa_tokens.build_summary_layout's for every length from
    0 to 3 chunks + 2; the mask of every window from 0 to 3 chunks equals kernels/ksa/naive.ksa_mask's, also when
    built a few query rows at a time."""
    for t in range(3 * chunk + 3):
        ours, ref = summary_layout(t, chunk, num_summary), build_summary_layout(t, chunk=chunk, num_summary=num_summary)
        assert torch.equal(ours["text_index"], ref.text_index) and torch.equal(ours["summary_index"], ref.summary_index)
        assert torch.equal(ours["slot"], ref.summary_slot) and torch.equal(ours["source"], ref.summary_source)
        # the layout of tokens start..t-1 that follow a cache of the first `start`: the whole one's tail, shifted by
        # the interleaved length of those `start` (which the cache's length gives back)
        for start in range(t + 1):
            part = summary_layout(t - start, chunk, num_summary, start=start)
            origin = start + (start // chunk) * num_summary
            done = (start // chunk) * num_summary  # summaries already in the cache
            assert cached_text_tokens(origin, chunk, num_summary) == start
            assert torch.equal(part["text_index"] + origin, ours["text_index"][start:])
            assert torch.equal(part["summary_index"] + origin, ours["summary_index"][done:])
            assert torch.equal(part["slot"], ours["slot"][done:])
            assert torch.equal(part["source"] + start, ours["source"][done:])
    total = ref.num_total
    for window in range(4):
        want = naive.ksa_mask(total, chunk=chunk, window=window, num_summary=num_summary)
        rows = [ksa_mask(torch.arange(i, min(total, i + 3)), total, chunk=chunk, num_summary=num_summary,
                         window=window) for i in range(0, total, 3)]
        assert torch.equal(torch.cat(rows), want)


@pytest.mark.parametrize("chunk, num_summary, window", [(4, 1, 2), (3, 2, 0), (5, 1, 7)])
def test_key_blocks_hold_every_key_a_query_sees_once(chunk, num_summary, window):
    """key_blocks against the mask over every key: for rows with holes anywhere (cached and new columns), each block
    gathers every key its queries see (ksa_mask over all columns), no column twice, and, in a row without holes,
    a near range no longer than the window's chunks and the block's queries: the far context is summaries alone.
    Blocks sized by `elements` keep to it (unless a block is one unit)."""
    rng = np.random.default_rng(chunk * 10 + window)
    period = chunk + num_summary
    merged = 0  # blocks of several units
    for trial in range(12):
        b, total = int(rng.integers(1, 4)), int(rng.integers(1, 400))
        t = int(rng.integers(1, total + 1))
        hole = rng.random((b, total)) < (0.3 if trial % 3 else 0.0)
        keys = np.where(hole, -1, np.cumsum(~hole, axis=1) - 1)  # a row's indices grow along its columns
        rows = keys[:, total - t:]
        block = None if trial % 2 else int(rng.integers(1, 40))
        elements, unit = int(rng.integers(50, 20000)), int(rng.integers(1, 9))
        columns = [np.flatnonzero(row >= 0) for row in keys]  # the column of each of a row's indices
        plan = key_blocks(rows, columns, total, chunk=chunk, num_summary=num_summary, window=window, heads=2,
                          block=block, elements=elements, unit=unit)
        summaries = summary_columns(columns, max(blk[2] for blk in plan["blocks"]), chunk=chunk,
                                    num_summary=num_summary)
        bounds = [blk[:2] for blk in plan["blocks"]]  # the blocks cover the queries in order
        assert bounds[0][0] == 0 and bounds[-1][1] == t and all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))
        every = ksa_mask(torch.from_numpy(rows), torch.from_numpy(keys), chunk=chunk, num_summary=num_summary,
                         window=window).numpy()  # [b, t, total]
        for n, (i0, i1, far, near) in enumerate(plan["blocks"]):
            if block is not None:
                assert i1 - i0 == min(block, t - i0)
            elif i1 - i0 > unit:  # a block of several units keeps to `elements`
                assert (i1 - i0) * b * 2 * (far + near) <= elements
                merged += 1
            for r in range(b):
                cols = [int(c) for c in summaries[r, :plan["far"][r, n]]]
                start = int(plan["near"][r, n])
                cols += [c for c in range(start, start + near) if c < total - t + i1]
                assert len(set(cols)) == len(cols), (trial, n, r)
                assert len(cols) <= far + near
                gathered = np.zeros(total, dtype=bool)
                gathered[cols] = True
                for i in range(i0, i1):
                    if rows[r, i] >= 0:
                        assert not (every[r, i] & ~gathered).any(), (trial, n, r, i)
                if not hole[r].any():  # the row's own near range
                    assert total - t + i1 - start <= (window + 1) * period + (i1 - i0)
    assert merged


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The tiny checkpoint as a KSA export (KSA on layer 1 of 2, chunks of 4, 2 summaries, windows 1 and 2)."""
    from transformers import AutoModelForCausalLM

    from models.hf.tiny import add_tiny_ksa, save_tiny_qwen3_moe

    d = tmp_path_factory.mktemp("ksa") / "hf"
    save_tiny_qwen3_moe(d)
    add_tiny_ksa(d, [1], chunk=4, num_summary=2, windows=[1, 2])
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, trust_remote_code=True).eval()
    # transformers runs its own copy of the file (its module cache): the class by name
    assert [type(layer.self_attn).__name__ for layer in m.model.layers] == ["Qwen3MoeAttention",
                                                                         Qwen3MoeKSAAttention.__name__]
    return m


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """verify.py's logit tolerance (fp32: the same arithmetic in another order, a few ulp of the logits' size)."""
    return (a - b).abs().max().item() <= LOGIT_ATOL + LOGIT_RTOL * b.abs().max().item()


def _cache_of(out):
    """The cache a forward returns (`cache` from transformers 5.2x, `past_key_values` before)."""
    return getattr(out, CACHE)


@torch.no_grad()
def test_cache_gives_the_whole_forwards_logits(model):
    """A prompt of any length (none, inside a chunk, a chunk's end) into the cache, then the rest 1 or 2 tokens a call
    (so calls end inside chunks and at their ends, and some complete a chunk with their first token): the text
    logits of the whole sequence run at once, and a cache holding the whole interleaved sequence. A cache length
    that ends among a chunk's summaries is refused."""
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    full = model(input_ids=ids, use_cache=False).logits
    for prompt in (0, 1, 3, 4, 7, 8, 13):
        out = model(input_ids=ids[:, :prompt], use_cache=True) if prompt else None
        cache, parts, i = (_cache_of(out), [out.logits], prompt) if prompt else (None, [], 0)
        while i < ids.shape[1]:
            n = 1 if i % 3 else 2
            out = model(input_ids=ids[:, i:i + n], **{CACHE: cache}, use_cache=True)
            cache, i = _cache_of(out), i + n
            parts.append(out.logits)
        assert _close(torch.cat(parts, dim=1), full), prompt
        assert cache.get_seq_length() == 30 + (30 // 4) * 2
    with pytest.raises(ValueError, match="ends among a chunk's summaries"):
        cached_text_tokens(5, 4, 2)


@torch.no_grad()
def test_generation_with_and_without_cache(model):
    """generate() with its cache gives the tokens of a greedy loop over whole-sequence forwards (each new token may
    complete a chunk, whose summaries then go in), and of generate() without a cache and with a chunked prefill,
    greedy and in beam search (which reorders the cache)."""
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=9, do_sample=False)
    loop = ids
    for _ in range(9):
        loop = torch.cat([loop, model(input_ids=loop, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, loop)
    assert torch.equal(out, model.generate(ids, max_new_tokens=9, do_sample=False, use_cache=False))
    # a prompt into the cache 5 tokens a call (transformers' chunked prefill): calls end inside chunks
    assert torch.equal(out, model.generate(ids, max_new_tokens=9, do_sample=False, prefill_chunk_size=5))
    beams = dict(max_new_tokens=8, do_sample=False, num_beams=3)
    assert torch.equal(model.generate(ids, **beams), model.generate(ids, **beams, use_cache=False))


@torch.no_grad()
def test_a_preallocated_cache_is_refused_naming_the_remedy(model):
    """A static cache (generate()'s cache_implementation="static", or one passed in) is preallocated, for the text
    tokens alone in generate(), while the interleaved sequence grows by the summaries: refused with a ValueError
    naming the cache and the remedy, before any of it is written, not a shape error from inside a layer."""
    from transformers.cache_utils import StaticCache

    ids = torch.randint(0, model.config.vocab_size, (1, 13), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"this one \(StaticCache\) is preallocated .* use a DynamicCache"):
        model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
    cache = StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(ValueError, match=r"this one \(StaticCache\) is preallocated"):
        model(input_ids=ids, **{CACHE: cache}, use_cache=True)
    assert cache.get_seq_length() == 0


@torch.no_grad()
def test_assisted_decoding_drops_the_rejected_tokens_summaries(model, monkeypatch):
    """Prompt lookup (transformers' assisted decoding) proposes the tokens that followed the prompt's last n-gram
    before, runs them in one call and crops the cache by those it rejects, counted in text tokens, while the cache
    holds their chunks' summaries too: it gives the tokens of generate() without a cache. The prompt repeats an
    earlier greedy run, so candidates are accepted and rejected, and crops drop columns."""
    from transformers.cache_utils import DynamicCache

    g = torch.Generator().manual_seed(5)
    start = torch.randint(0, model.config.vocab_size, (1, 6), generator=g)
    ids = torch.cat([model.generate(start, max_new_tokens=30, do_sample=False), start], dim=1)
    want = model.generate(ids, max_new_tokens=24, do_sample=False, use_cache=False)
    crops, crop = [], DynamicCache.crop
    monkeypatch.setattr(DynamicCache, "crop", lambda self, n: crops.append(n) or crop(self, n))
    assert torch.equal(model.generate(ids, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=5), want)
    assert any(n < 0 for n in crops), crops


@torch.no_grad()
def test_padded_rows_run_as_alone(model):
    """A left-padded batch: each row gives the logits of its tokens run alone (its chunks start at its first token),
    also a token at a time after a prompt in the cache, when the rows complete their chunks at different steps;
    generate() continues each row as it continues that row alone, with the cache as without it, greedy and in beam
    search. Right padding and a gap inside a row leave those tokens out of the row's document. A cache of another
    row count is refused."""
    g = torch.Generator().manual_seed(3)
    long, short = (torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in (17, 10))
    pad = 17 - 10
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    batch = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(batch[1, :pad], torch.zeros_like(batch[1, :pad]))
    alone = [model(input_ids=x, use_cache=False).logits for x in (long, short)]
    assert _close(batch[1:, pad:], alone[1]) and _close(batch[:1], alone[0])
    # the first 12 (long) and 5 (short) tokens into the cache, then the rest one at a time. The prompt's call runs
    # each row alone, so its padding is not computed: 12 tokens + 3 chunks' 2 summaries, and 5 + 1 chunk's 2
    seen, inner = [], model.model.forward

    def spy(*args, **kwargs):
        seen.append(tuple(kwargs["inputs_embeds"].shape[:2]))
        return inner(*args, **kwargs)

    model.model.forward = spy
    try:
        out = model(input_ids=ids[:, :12], attention_mask=mask[:, :12], use_cache=True)
    finally:
        del model.model.forward
    assert seen == [(1, 18), (1, 7)]
    cache, steps, sizes = _cache_of(out), [out.logits[:, -1:]], []
    for i in range(12, 17):
        sizes.append(cache.get_seq_length())
        out = model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], **{CACHE: cache}, use_cache=True)
        steps.append(out.logits)
    steps = torch.cat(steps, dim=1)
    assert _close(steps[:1], alone[0][:, 11:]) and _close(steps[1:], alone[1][:, 4:])
    # a cache cropped back to where it was before token 14 (transformers' crop keeps the first columns; the rows'
    # layouts follow), then the same tokens again: the same logits
    cropped = copy.deepcopy(cache)
    cropped.crop(sizes[2] - cropped.get_seq_length())  # a negative count: the columns to drop
    for i in range(14, 17):
        out = model(input_ids=ids[:, i:i + 1], attention_mask=mask[:, :i + 1], **{CACHE: cropped}, use_cache=True)
        assert _close(out.logits, steps[:, i - 11:i - 10]), i
    assert cropped.get_seq_length() == cache.get_seq_length()
    assert [c.tolist() for c in cropped.ksa_columns] == [c.tolist() for c in cache.ksa_columns]
    # a crop inside a step where a row completed a chunk (its token, then its 2 summaries) leaves that row's
    # sequence among its summaries: refused
    wide = next(k for k, (a, b) in enumerate(zip(sizes, sizes[1:] + [cache.get_seq_length()])) if b - a == 3)
    torn = copy.deepcopy(cache)
    torn.crop(sizes[wide] + 2 - torn.get_seq_length())
    with pytest.raises(ValueError, match="ends among a chunk's summaries"):
        model(input_ids=ids[:, :1], attention_mask=mask[:, :1], **{CACHE: torn}, use_cache=True)
    # the rows' interleaved sequences run as one batch, left-aligned by holes: the cache has fewer columns than the
    # rows' layouts one after another (each row's 17 or 10 tokens, 4 or 2 chunks of 2 summaries)
    assert cache.get_seq_length() < (17 + 8) + (10 + 4)
    assert (cache.ksa_own >= 0).sum(1).tolist() == [17 + 8, 10 + 4]
    # rows reordered across the batch (beam search reorders within a prompt's beams, which share a layout): each
    # row's layout follows its keys and values
    model._reorder_cache(cache, torch.tensor([1, 0]))
    nxt = torch.randint(0, model.config.vocab_size, (2, 1), generator=g)
    out = model(input_ids=nxt, **{CACHE: cache}, use_cache=True).logits
    for r, doc in enumerate((short, long)):
        assert _close(out[r], model(input_ids=torch.cat([doc, nxt[r:r + 1]], dim=1), use_cache=False).logits[0, -1:])
    for kw in (dict(max_new_tokens=6, do_sample=False), dict(max_new_tokens=6, do_sample=False, num_beams=3)):
        out = model.generate(ids, attention_mask=mask, **kw)
        assert torch.equal(out, model.generate(ids, attention_mask=mask, use_cache=False, **kw))
        assert torch.equal(out[1, pad:], model.generate(short, **kw)[0])
        assert torch.equal(out[:1], model.generate(long, **kw))
    # right padding, and a gap inside a row: a row's document is its unmasked tokens in order, also when more
    # follow a cache that ends in padding
    gap = torch.ones_like(ids)
    gap[0, 3:5] = 0  # row 0: tokens 0-2 and 5-16
    gap[1, 10:] = 0  # row 1: right padding after 10 tokens
    first = model(input_ids=ids[:, :14], attention_mask=gap[:, :14], use_cache=True)
    rest = model(input_ids=ids[:, 14:], attention_mask=gap, **{CACHE: _cache_of(first)}, use_cache=True)
    got = torch.cat([first.logits, rest.logits], dim=1)
    doc0 = torch.cat([ids[:1, :3], ids[:1, 5:]], dim=1)
    assert _close(got[:1, gap[0].bool()], model(input_ids=doc0, use_cache=False).logits)
    assert _close(got[1:, :10], model(input_ids=ids[1:, :10], use_cache=False).logits)
    assert torch.equal(got[0, 3:5], torch.zeros_like(got[0, 3:5]))
    assert torch.equal(got[1, 10:], torch.zeros_like(got[1, 10:]))
    # a row of padding only in the first call: holes, zero logits; its document starts with its first token
    empty = torch.ones_like(ids[:, :8])
    empty[1] = 0
    first = model(input_ids=ids[:, :8], attention_mask=empty, use_cache=True)
    assert torch.equal(first.logits[1], torch.zeros_like(first.logits[1]))
    rest = model(input_ids=ids[:, 8:], attention_mask=torch.ones_like(ids), **{CACHE: _cache_of(first)}, use_cache=True)
    assert _close(rest.logits[1:], model(input_ids=ids[1:, 8:], use_cache=False).logits)
    assert _close(torch.cat([first.logits[:1], rest.logits[:1]], dim=1), alone[0])
    # a cache of another row count (as transformers' batch_repeat_interleave leaves it) is refused
    unpadded = _cache_of(model(input_ids=long, use_cache=True))
    unpadded.batch_repeat_interleave(2)
    with pytest.raises(ValueError, match="the cache holds a batch of 1 row and this call one of 2"):
        model(input_ids=ids[:, :1], **{CACHE: unpadded}, use_cache=True)
    with pytest.raises(ValueError, match="leaves out every token of this call"):
        model(input_ids=ids[:, :2], attention_mask=torch.zeros(2, 2, dtype=torch.long))


@torch.no_grad()
def test_query_chunks_and_rows_change_nothing(model):
    """Queries a few at a time give the logits of one pass, also in a padded batch after a cache; a row of a batch
    gives its logits alone."""
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    whole = model(input_ids=ids).logits
    assert _close(whole[1:], model(input_ids=ids[1:]).logits)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # the second row left-padded: holes in the cache and in the call
    padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    model.query_block = 5
    try:
        assert _close(model(input_ids=ids).logits, whole)
        # a prompt into the cache, then the rest in one call of several blocks, each with its far summaries
        cache = _cache_of(model(input_ids=ids[:, :11], attention_mask=mask[:, :11], use_cache=True))
        rest = model(input_ids=ids[:, 11:], attention_mask=mask, use_cache=True, **{CACHE: cache}).logits
        assert _close(rest, padded[:, 11:])
    finally:
        model.query_block = None


@torch.no_grad()
def test_logits_to_keep(model):
    """logits_to_keep (transformers' convention) keeps the logits of the last k tokens, or of the positions a tensor
    names: the same values as the whole logits' columns, also in a left-padded batch (zeros at padding). generate()
    asks for the last token's alone, so a prefill builds no [prompt, vocab] logits."""
    import functools

    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    for m in (None, mask):
        whole = model(input_ids=ids, attention_mask=m, use_cache=False).logits
        named = [0, 5, 6, 12]
        for keep, cols in ((1, [18]), (3, [16, 17, 18]), (40, list(range(19))), (torch.tensor(named), named)):
            part = model(input_ids=ids, attention_mask=m, use_cache=False, logits_to_keep=keep).logits
            assert part.shape == (2, len(cols), model.config.vocab_size)
            assert _close(part, whole[:, cols]), (m is not None, keep)
    seen = []
    forward = model.forward

    @functools.wraps(forward)
    def spy(*args, **kwargs):
        seen.append(kwargs.get("logits_to_keep"))
        return forward(*args, **kwargs)

    model.forward = spy
    try:
        model.generate(ids, max_new_tokens=3, do_sample=False)
    finally:
        del model.forward
    assert seen == [1, 1, 1]


def test_a_config_without_ksa_layers_is_refused():
    from transformers import Qwen3MoeConfig

    from models.hf.modeling_qwen3_moe_ksa import Qwen3MoeKSAForCausalLM

    base = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                ksa_chunk=4, ksa_num_summary=1, ksa_windows=[1])
    for layers, match in (([], "names no layer"), ([2], r"layers \[2\] are not in 0..1")):
        with pytest.raises(ValueError, match=match):
            Qwen3MoeKSAForCausalLM(Qwen3MoeConfig(**base, ksa_layers=layers))
