"""transformers' code for a DSA model (models/hf/modeling_qwen3_moe_dsa.py, written beside a DSA export).

Its logits against our model are checked in test_hf_qwen3_moe.py (test_dsa_import_export_round_trip) and, at TP2/EP2
on a trained export, in tests/dist/test_hf_roundtrip.py. Here: its selection against kernels/dsa/naive.py, and what
inference needs beyond one forward (the cache of index keys in generation, padded batches, query chunks).
"""

import inspect
import json
import shutil
import sys

import pytest
import torch
from transformers import Qwen3MoeForCausalLM

from kernels.dsa import naive
from models.hf.modeling_qwen3_moe_dsa import (Qwen3MoeDSAAttention, _cached_index_keys, dense_chunk, select_keys,
                                              top_positions)
from models.hf.verify import LOGIT_ATOL, LOGIT_RTOL

TOPK = 8  # of sequences of 20-40 tokens: the indexers select
# the keyword that passes a cache: `cache` from transformers 5.2x (the pinned 5.24), `past_key_values` before (5.17)
CACHE = "cache" if "cache" in inspect.signature(Qwen3MoeForCausalLM.forward).parameters else "past_key_values"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The tiny checkpoint with indexers on both layers, top-8."""
    from models.hf.tiny import add_tiny_dsa_indexers, save_tiny_qwen3_moe

    d = tmp_path_factory.mktemp("dsa") / "hf"
    save_tiny_qwen3_moe(d)
    add_tiny_dsa_indexers(d, [0, 1], topk=TOPK)
    return d


@pytest.fixture(scope="module")
def export(hf_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, trust_remote_code=True).eval()
    # transformers runs its own copy of the file (its module cache): the class by name
    assert [type(layer.self_attn).__name__ for layer in m.model.layers] == [Qwen3MoeDSAAttention.__name__] * 2
    return m


def _attending(m, densely: bool | None):
    for layer in m.model.layers:
        layer.self_attn.attend_densely = densely


@pytest.fixture(params=[True, False], ids=["dense", "gathered"])
def model(export, request):
    """The export, its layers attending one way: over every key with the selection as a bias, or over gathered keys
    (by its rule, sequences this short attend densely)."""
    _attending(export, request.param)
    yield export
    _attending(export, None)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """verify.py's logit tolerance (fp32: the same arithmetic in another order, a few ulp of the logits' size)."""
    return (a - b).abs().max().item() <= LOGIT_ATOL + LOGIT_RTOL * b.abs().max().item()


@pytest.mark.parametrize("packed", [False, True])
def test_selection_is_the_reference_selection_ties_included(packed):
    """select_keys picks the set kernels/dsa/naive.topk_indices picks: integer-valued index inputs make many equal
    scores (ties go to the smaller position), and ReLU makes many zeros (-0.0 and +0.0 equal); with packed
    documents the mask keeps each query in its document; a query with fewer eligible keys than top-k gets them all."""
    g = torch.Generator().manual_seed(0)
    b, t, hi, di, k = 2, 37, 3, 4, 6
    q = torch.randint(-2, 3, (b, t, hi, di), generator=g).float()
    w = torch.randint(0, 3, (b, t, hi), generator=g).float()
    kk = torch.randint(-2, 3, (b, t, di), generator=g).float()
    cu = torch.tensor([0, 5, 19, 37]) if packed else None
    allowed = naive.eligible_mask(b, t, cu, "cpu")
    sel, valid = select_keys(q, w, kk, allowed, k)
    ref = naive.topk_indices(q, w, kk, k, cu_seqlens=cu)
    ours = torch.where(valid, sel, torch.full_like(sel, t + 1)).sort(dim=-1).values
    ours = torch.where(ours == t + 1, torch.full_like(ours, -1), ours)
    assert torch.equal(ours.int(), ref)
    scores = naive.index_scores(q, w, kk)
    assert (scores.round() == scores).all() and len(scores.unique()) < 50  # of 2738: ties to break


def test_top_positions_is_a_stable_sort_of_the_scores():
    """top_positions' set against the first k of a stable descending sort (equal scores in position order), on
    scores with many ties, both zeros (-0.0 equal to +0.0, as a sort compares them), negatives, and positions not
    allowed (ranked below every allowed one; a row with fewer allowed than k gets them all first)."""
    g = torch.Generator().manual_seed(3)
    for n, k in [(1, 1), (7, 3), (50, 50), (300, 17), (1000, 64)]:
        scores = torch.randint(-3, 4, (4, 5, n), generator=g).float() * 0.5
        scores[torch.rand(scores.shape, generator=g) < 0.2] = -0.0
        allowed = torch.rand(scores.shape, generator=g) < 0.7
        allowed[0, 0] = False  # a row with nothing allowed
        allowed[0, 1] = torch.arange(n) < min(n, 2)  # fewer allowed than k
        ours = top_positions(scores, allowed, k).sort(dim=-1).values
        ranked = scores.masked_fill(~allowed, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
        assert torch.equal(ours, ranked[..., :k].sort(dim=-1).values), (n, k)
        assert (scores == 0).any() and (torch.signbit(scores) & (scores == 0)).any()  # both zeros present


def test_top_positions_ranks_nan_and_inf_as_the_trainer_does():
    """Against the trainer's reference ranking (kernels/dsa/naive.rank_topk): a NaN score ranks as -inf (a key
    whose index vector went NaN is chosen last, not first: NaN's bits read as an integer are the largest), +inf
    first, and an allowed key scored -inf or NaN still before every position not allowed. The allowed positions
    chosen are the reference's."""
    from kernels.dsa.naive import rank_topk

    g = torch.Generator().manual_seed(5)
    for n, k in [(9, 4), (300, 17), (1000, 64)]:
        scores = torch.randn(3, 6, n, generator=g)
        special = torch.rand(scores.shape, generator=g)
        scores[special < 0.1] = float("nan")
        scores[(special >= 0.1) & (special < 0.15)] = float("-inf")
        scores[(special >= 0.15) & (special < 0.17)] = float("inf")
        scores[0, 2] = float("nan")                          # a row of NaN: position order
        allowed = torch.rand(scores.shape, generator=g) < 0.6
        allowed[0, 1] = torch.arange(n) < min(n, k - 1)      # fewer allowed than k: all of them
        allowed[1, 1] = torch.arange(n) < k + 2              # a few more allowed than k, some of them NaN
        scores[1, 1, : k + 2 : 2] = float("nan")
        ours = top_positions(scores, allowed, k)
        chosen = [sorted(p for p in row.tolist() if a[p]) for row, a in zip(ours.view(-1, k), allowed.view(-1, n))]
        ref = rank_topk(scores, allowed, k).view(-1, k)
        assert chosen == [[p for p in row.tolist() if p >= 0] for row in ref], (n, k)
        assert scores.isnan().any() and (scores == float("-inf")).any()


def test_generation_with_the_cache_gives_the_full_forward(model):
    """Each DSA layer's index keys live in transformers' cache (its indexed-attention layers, or beside a cache
    without them): a prefill of 20 tokens, then one token at a time, gives at every step the logits of one forward
    over the whole sequence; and generate() picks the same tokens with and without the cache."""
    from transformers.cache_utils import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    full = model(input_ids=ids, use_cache=False).logits
    # the model's cache (index keys in its indexed-attention layers), and one without such layers, as a cache built
    # without the config or an older transformers (5.17) makes: the index keys then live beside it
    for cache in (DynamicCache(config=model.config), DynamicCache()):
        steps = [model(input_ids=ids[:, :20], **{CACHE: cache}, use_cache=True).logits]
        for i in range(20, 32):
            steps.append(model(input_ids=ids[:, i:i + 1], **{CACHE: cache}, use_cache=True).logits)
        keys = getattr(cache.layers[0], "indexer_keys", None)
        keys = cache.dsa_index_keys[0] if keys is None else keys
        assert keys.shape == (2, 32, model.config.index_head_dim)
        assert _close(torch.cat(steps, dim=1), full)
    assert not hasattr(DynamicCache(config=model.config), "dsa_index_keys")
    with torch.no_grad():
        cached = model.generate(ids[:, :20], max_new_tokens=10, do_sample=False, use_cache=True)
        uncached = model.generate(ids[:, :20], max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_beam_search_and_a_cropped_cache_keep_the_index_keys_in_step(model):
    """With either cache (the model's; one without indexed-attention layers, whose index keys live beside it): beam
    search (which reorders the cache every step) picks the tokens it picks without a cache, and a cache cropped by
    two tokens (as assisted decoding does) continues with the whole forward's logits. A cache whose keys and index
    keys disagree is refused, and so are index keys beside a cache whose rows were repeated."""
    from transformers.cache_utils import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    beams = dict(max_new_tokens=10, do_sample=False, num_beams=3)
    want = model.generate(ids[:, :20], use_cache=False, **beams)
    full = model(input_ids=ids, use_cache=False).logits
    for make in (lambda: DynamicCache(config=model.config), DynamicCache):
        assert torch.equal(model.generate(ids[:, :20], **beams, **{CACHE: make()}), want)
        cache = make()
        model(input_ids=ids[:, :15], **{CACHE: cache}, use_cache=True)
        model(input_ids=ids[:, 15:18], **{CACHE: cache}, use_cache=True)
        cache.crop(-2)
        assert _close(model(input_ids=ids[:, 16:], **{CACHE: cache}, use_cache=True).logits, full[:, 16:])
    cache = DynamicCache()
    cache.dsa_index_keys = {0: torch.zeros(2, 3, model.config.index_head_dim)}
    with pytest.raises(ValueError, match="layer 0: the cache holds 9 keys but 3 index keys"):
        _cached_index_keys(cache, 0, torch.zeros(2, 1, model.config.index_head_dim), 10)
    # a prompt's cache repeated for two rows (batch_repeat_interleave, as a user may share one prefill): the model's
    # cache, where its layers keep the index keys (transformers 5.2x), continues both rows; index keys beside a cache
    # do not follow such an edit and are refused, naming the remedy
    for make in (lambda: DynamicCache(config=model.config), DynamicCache):
        cache = make()
        model(input_ids=ids[:1, :15], **{CACHE: cache}, use_cache=True)
        cache.batch_repeat_interleave(2)
        beside = not hasattr(cache.layers[0], "update_indexer")
        if beside:
            with pytest.raises(ValueError, match="layer 0: the index keys beside the cache hold a batch of 1 and this "
                                                 "call one of 2"):
                model(input_ids=ids[:1, 15:].expand(2, -1), **{CACHE: cache}, use_cache=True)
        else:
            out = model(input_ids=ids[:1, 15:].expand(2, -1), **{CACHE: cache}, use_cache=True).logits
            assert _close(out, full[:1, 15:].expand(2, -1, -1))


def _left_padded_pair(model, *, seed: int, short_len: int, low: int):
    """Two random prompts, of 30 tokens and of short_len, and their batch: the short one left-padded with 0s, the
    attention mask 0 on its padding. (long, short, ids, mask)."""
    g = torch.Generator().manual_seed(seed)
    long = torch.randint(low, model.config.vocab_size, (1, 30), generator=g)
    short = torch.randint(low, model.config.vocab_size, (1, short_len), generator=g)
    pad = 30 - short_len
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :pad] = 0
    return long, short, ids, mask


@torch.no_grad()
def test_generation_with_a_static_cache_gives_the_full_forward(model):
    """generate(cache_implementation="static"), the preallocated cache torch.compile wants: its layers return their
    whole buffer (the rows not yet filled too) and generate() builds one mask per layer type of the config. From a
    left-padded batch of two prompts longer than the top-k, every token is the argmax of a forward over its prefix
    without a cache, and each row's tokens are those generated from its prompt alone."""
    long, short, ids, mask = _left_padded_pair(model, seed=7, short_len=12, low=1)   # 0 is the padding token here
    new = 8
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         cache_implementation="static")
    assert out.shape == (2, 30 + new)
    for row, prompt in ((0, long), (1, short)):
        alone = torch.cat([prompt, out[row:row + 1, 30:]], dim=1)
        for i in range(prompt.shape[1], alone.shape[1]):  # each token: the uncached forward's argmax at its prefix
            assert model(input_ids=alone[:, :i], use_cache=False).logits[0, -1].argmax().item() == alone[0, i].item()


@torch.no_grad()
def test_generation_with_a_static_cache_is_not_compiled(export, monkeypatch):
    """generate() compiles a model's forward for a preallocated cache (on a GPU; here on the CPU too, as its
    compile_config may ask), and compiled, the index keys kept between steps came out wrong on the GPU
    (bench/RESULTS.md): the DSA export runs its forward as it is. On the model as transformers builds it, asking for
    the compiled forward fails the test; the tokens are the uncached generation's."""
    from transformers.generation.configuration_utils import CompileConfig

    def compiled(*args, **kwargs):
        raise AssertionError("generate() compiled the DSA export's forward")

    monkeypatch.setattr(export, "get_compiled_call", compiled)
    config = CompileConfig()
    config._compile_all_devices = True   # the rule's device test passes on the CPU, as on a GPU
    ids = torch.randint(1, export.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(11))
    out = export.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static",
                          compile_config=config)
    plain = export.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(out, plain)


def test_padded_batch_rows_are_the_rows_alone(model):
    """A left-padded row of a batch (attention_mask 0 on its padding) gives the logits of the same tokens run alone:
    the indexers never select a padding key. Chunking the queries (3 per chunk) changes nothing."""
    long, short, ids, mask = _left_padded_pair(model, seed=2, short_len=21, low=0)
    pad = 30 - 21
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    assert _close(batch[:1], model(input_ids=long, use_cache=False).logits)
    assert _close(batch[1:, pad:], model(input_ids=short, use_cache=False).logits)
    densely = model.model.layers[0].self_attn.attend_densely
    for layer in model.model.layers:
        layer.self_attn.query_chunk = 3
    try:
        chunked = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        _attending(model, not densely)  # the other way
        other = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    finally:
        _attending(model, densely)
        for layer in model.model.layers:
            layer.self_attn.query_chunk = None
    assert _close(chunked, batch)
    assert _close(other, batch)
    # chunks sized by the bytes allowed, small enough that a chunk's selection runs in pieces of 2 queries
    code = sys.modules[type(model.model.layers[0].self_attn).__module__]  # transformers' copy of the file
    allowed = code.QUERY_CHUNK_BYTES
    code.QUERY_CHUNK_BYTES = 2 * 2 * (4 * model.config.index_n_heads + 25) * 30 * 2  # 2 x (2 rows x 30 keys x the
    # selection's bytes per key) x 2 queries
    try:
        pieces = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    finally:
        code.QUERY_CHUNK_BYTES = allowed
    assert _close(pieces, batch)


def test_a_chunk_attends_densely_up_to_its_keys_per_top_k(export):
    """By the rule (attend_densely None), a chunk whose last query sees at most DENSE_KEYS_PER_TOPK x the top-k keys
    attends over every key, a chunk beyond over gathered keys: a call one token longer splits, its last query
    gathered, with the logits of either way alone; a generation step after a long prompt gathers too."""
    from transformers.cache_utils import DynamicCache

    code = sys.modules[type(export.model.layers[0].self_attn).__module__]  # transformers' copy of the file
    calls = []
    for layer in export.model.layers:
        for way in ("_attend_densely", "_attend_gathered"):
            bound = getattr(layer.self_attn, way)
            setattr(layer.self_attn, way, lambda q, *a, _f=bound, _w=way: calls.append((_w, q.shape[2])) or _f(q, *a))
    try:
        most = code.DENSE_KEYS_PER_TOPK * TOPK
        dense, gathered = "_attend_densely", "_attend_gathered"
        ids = torch.randint(0, export.config.vocab_size, (1, most + 1), generator=torch.Generator().manual_seed(6))
        for n, want in ((most, [(dense, most)]), (most + 1, [(dense, most), (gathered, 1)])):
            calls.clear()
            split = export(input_ids=ids[:, :n], use_cache=False).logits
            assert calls == want * 2
        for densely in (True, False):
            _attending(export, densely)
            assert _close(split, export(input_ids=ids, use_cache=False).logits)
        _attending(export, None)
        for prompt, want in ((most - 1, dense), (most, gathered)):  # the step's query sees prompt + 1 keys
            cache = DynamicCache(config=export.config)
            export(input_ids=ids[:, :prompt], **{CACHE: cache}, use_cache=True)
            calls.clear()
            export(input_ids=ids[:, prompt:prompt + 1], **{CACHE: cache}, use_cache=True)
            assert calls == [(want, 1)] * 2
    finally:
        _attending(export, None)
        for layer in export.model.layers:
            for way in ("_attend_densely", "_attend_gathered"):
                del layer.self_attn.__dict__[way]


def test_a_dense_chunk_holds_the_most_queries_its_bytes_allow():
    """dense_chunk(budget, seen): the largest c with c * (seen + c) <= budget (a query's bytes grow with the keys up to
    the chunk's last one), at least 1; checked against a search over c."""
    for budget in (0, 1, 2, 5, 99, 100, 10 ** 6, 2 ** 29):
        for seen in (0, 1, 7, 1000, 131071):
            c = dense_chunk(budget, seen)
            most = max([0] + [x for x in range(1, 40000) if x * (seen + x) <= budget])
            assert c == max(1, most), (budget, seen, c, most)


def test_a_config_without_dsa_layers_is_refused(hf_dir, tmp_path):
    from transformers import AutoConfig

    from models.hf.modeling_qwen3_moe_dsa import Qwen3MoeDSAForCausalLM

    cfg = json.loads((hf_dir / "config.json").read_text())
    for layers, match in (([], "names no layer"), ([2], r"layers \[2\] are not in 0..1")):
        d = tmp_path / f"c{len(layers)}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**cfg, "dsa_layers": layers}))
        with pytest.raises(ValueError, match=match):
            Qwen3MoeDSAForCausalLM(AutoConfig.from_pretrained(str(d)))
    shutil.rmtree(tmp_path)
