"""DSA kernels (kernels/dsa) against the PyTorch reference (kernels/dsa/naive.py).

On CPU the Triton kernels run under TRITON_INTERPRET=1 in fp32 (bf16 is wrong in the interpreter);
on a GPU the same tests run compiled fp32 kernels, and `test_gpu_bf16` checks bf16 numerics.
Tolerances are relative RMSE ratios (tests/kernels/helpers.py) against float64 references.
Top-k selections are compared for exact equality on integer-valued inputs, whose scores are
exact in fp32 whatever the summation order (and tie often, which exercises the tie rule).
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import warnings

import pytest
import torch

from kernels.dsa import (build_sparse_plan, default_block_q, dsa_attention, dsa_topk,
                         indexer_kl_loss, naive, sparse_gqa_attention)
from kernels.dsa.common import row_doc_start
from kernels.dsa.indexer_loss import indexer_kl_bwd, indexer_kl_fwd
from kernels.dsa.plan import build_sparse_plan_torch
from kernels.dsa.sparse_attn import sparse_attn_bwd, sparse_attn_fwd
from tests.kernels.helpers import assert_close, poison_

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 kernels against float64 references: fp32 rounding of sums over <= 1000 keys gives ~1e-7.
TOL_OUT = 1e-5      # o, lse, per-token KL: one fp32 online softmax / log-sum-exp per row
TOL_GRAD = 2e-5     # dq, dk, dv, indexer grads: fp32 atomics add in any order (observed ~5e-7)


@pytest.fixture(scope="module", autouse=True)
def _interpreter_fixes():
    """Make triton 3.6's interpreter usable here (CPU only, restored after this module).

    1. numpy >= 2 refuses int() of the 1-element arrays the interpreter uses for scalars, so any
       `range(0, n)` with a runtime bound fails; take the element instead.
    2. Integer-overflow sanitising and 3. re-patching triton.language at every device-function call
       (tl.sum, tl.max, ...) cost several ms per op; neither changes results.
    """
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        yield
        return
    import triton.language as tl
    import triton.runtime.interpreter as ti

    with pytest.MonkeyPatch.context() as mp:
        if hasattr(ti, "_patch_lang_tensor"):
            orig_patch = ti._patch_lang_tensor

            def patch_tensor(tensor, scope):
                orig_patch(tensor, scope)
                scope.set_attr(tensor, "__index__",
                               lambda self: int(self.handle.data.reshape(-1)[0]))

            mp.setattr(ti, "_patch_lang_tensor", patch_tensor)
        builder = getattr(ti, "interpreter_builder", None)
        if builder is not None and hasattr(builder.options, "sanitize_overflow"):
            mp.setattr(builder, "options",
                       dataclasses.replace(builder.options, sanitize_overflow=False))
        if all(hasattr(ti, n) for n in ("GridExecutor", "InterpretedFunction", "_patch_lang",
                                        "InterpreterError")):
            seen: set = set()
            grid_call = ti.GridExecutor.__call__

            def grid_call_fresh(self, *args, **kwargs):
                seen.clear()
                try:
                    return grid_call(self, *args, **kwargs)
                finally:
                    seen.clear()

            def device_call(self, *args, **kwargs):
                key = tuple(sorted(id(v) for v in self.fn.__globals__.values()
                                   if inspect.ismodule(v) and v in (tl, tl.core)))
                if key not in seen:  # triton.language is already patched for this launch
                    ti._patch_lang(self.fn)
                    seen.add(key)
                try:
                    return self.rewrite()(*args, **kwargs)
                except Exception as e:
                    raise ti.InterpreterError(repr(e)) from e

            mp.setattr(ti.GridExecutor, "__call__", grid_call_fresh)
            mp.setattr(ti.InterpretedFunction, "__call__", device_call)
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)


def _cu(*bounds):
    return torch.tensor(bounds, dtype=torch.int32, device=DEV)


def _int_indexer(B, T, HI, DI, lo=-4, hi=5, w_lo=-1):
    """Integer-valued indexer inputs: every score is exact in fp32 (and ties are common; rows
    whose weights are all <= 0 tie at their maximum, 0, and go through the exact fallback)."""
    q = torch.randint(lo, hi, (B, T, HI, DI), device=DEV).float()
    w = torch.randint(w_lo, 3, (B, T, HI), device=DEV).float()
    k = torch.randint(lo, hi, (B, T, DI), device=DEV).float()
    return q, w, k


def _check_idx_valid(idx, topk, cu_seqlens=None):
    """Shape, -1 padding after the valid entries, ascending, causal, same document, count."""
    B, T, K = idx.shape
    assert K == topk and idx.dtype == torch.int32
    start = naive.doc_start(B, T, cu_seqlens, idx.device)
    t = torch.arange(T, device=idx.device).view(1, T, 1)
    valid = idx >= 0
    assert ((idx >= -1)).all(), "padding must be -1"
    assert (valid.sum(-1) == torch.clamp(t.squeeze(-1) - start + 1, max=topk)).all(), "count"
    assert (valid[..., :-1] | ~valid[..., 1:]).all(), "a valid entry after padding"
    assert ((idx <= t) | ~valid).all(), "a future key was selected"
    assert ((idx >= start.unsqueeze(-1)) | ~valid).all(), "a key across a document boundary"
    both = valid[..., 1:] & valid[..., :-1]
    assert ((idx[..., 1:] > idx[..., :-1]) | ~both).all(), "entries not strictly ascending"


# ----------------------------------------------------------------------------- top-k selection

def test_naive_topk_tie_rule():
    """Ties go to the smaller position; -0.0 equals +0.0; rows ascending, -1 padded."""
    scores = torch.tensor([[[0.0, 0, 0, 0], [1.0, 1.0, 0, 0], [-0.0, 0.0, 2.0, 0],
                            [3.0, -0.0, 0.0, 3.0]]], dtype=torch.float64)
    q = torch.zeros(1, 4, 1, 1)
    idx = naive.topk_indices(q, torch.zeros(1, 4, 1), torch.zeros(1, 4, 1), 2, scores_BTT=scores)
    assert idx.tolist() == [[[0, -1], [0, 1], [0, 2], [0, 3]]]


TOPK_CASES = [
    # B, T, HI, DI, topk, cap, num_samples, integer range, cu_seqlens bounds
    pytest.param(2, 63, 4, 16, 8, 32, 16, 4, None, id="T63-sampled-threshold"),
    pytest.param(1, 111, 4, 16, 8, 32, 16, 4, (0, 40, 41, 111), id="T111-packed-docs"),
    pytest.param(1, 63, 2, 16, 1, None, None, 4, None, id="topk1"),
    pytest.param(1, 50, 2, 16, 64, None, None, 4, None, id="topk-larger-than-T"),
    # wide range, positive weights: few ties, so sampled thresholds rarely need the fallback
    pytest.param(1, 1000, 2, 16, 16, 128, 64, 64, (0, 700, 1000), id="T1000"),
    # one query block per batch row: the stored-score kernel's 64-row tile spans both batch rows
    pytest.param(3, 20, 2, 16, 4, 8, 4, 4, None, id="B3-score-tile-spans-batch-rows"),
]


@pytest.fixture(params=["stored", "fused"])
def topk_mode(request, monkeypatch):
    """Both selection paths: stored scores (score / compact / select) and the fused filter."""
    from kernels.dsa import topk as tk
    orig = tk._config
    monkeypatch.setattr(tk, "_config", lambda *a, **k: {**orig(*a, **k), "mode": request.param})
    return request.param


@pytest.mark.parametrize("B,T,HI,DI,topk,cap,m,vrange,cu", TOPK_CASES)
def test_topk_exact(B, T, HI, DI, topk, cap, m, vrange, cu, topk_mode):
    if T >= 1000 and topk_mode == "stored" and not torch.cuda.is_available():
        pytest.skip("the long case runs on both paths on a GPU; under the interpreter only on the "
                    "fused one (the stored path's one-row compact programs: 50 vs 9 s)")
    cu = None if cu is None else _cu(*cu)
    q, w, k = _int_indexer(B, T, HI, DI, -vrange, vrange + 1, w_lo=1 if vrange > 4 else -1)
    ref = naive.topk_indices(q, w, k, topk, cu)
    stats = {}
    out = dsa_topk(q, w, k, topk, cu_seqlens=cu, cap=cap, num_samples=m, stats=stats)
    _check_idx_valid(out, topk, cu)
    assert torch.equal(out, ref), "selection differs from the reference"
    if T < 1000:  # (the long case runs once: the interpreter is slow)
        again = dsa_topk(q, w, k, topk, cu_seqlens=cu, cap=cap, num_samples=m)
        assert torch.equal(again, out), "selection is not deterministic"
    else:
        assert stats["fallback_rows"] < T // 20, stats


@pytest.mark.parametrize("B,T,cu", [(1, 160, None), (2, 80, None), (1, 160, (0, 50, 160))],
                         ids=["B1", "B2", "packed"])
def test_topk_stored_in_chunks(B, T, cu, monkeypatch):
    """The stored path cut into several chunks (a small chunk_bytes), its compact streaming each
    row in 32-key tiles (the next tile's load in flight) and the select's output pass taking 16
    candidates at a time (ties at the threshold ranked across those pieces): the selection is
    the reference's."""
    from kernels.dsa import topk as tk
    orig = tk._config
    monkeypatch.setattr(tk, "_config", lambda *a, **k: {**orig(*a, **k), "mode": "stored",
                                                         "select_sub": 16, "BC": 32})
    cu = None if cu is None else _cu(*cu)
    q, w, k = _int_indexer(B, T, 2, 16, -3, 4)
    ref = naive.topk_indices(q, w, k, 16, cu)
    BT, cap = orig(torch.device(DEV))["BT"], 64
    budget = 2 * BT * (T * 4 + cap * 8)  # two blocks per chunk
    out = dsa_topk(q, w, k, 16, cu_seqlens=cu, cap=cap, num_samples=16, chunk_bytes=budget)
    _check_idx_valid(out, 16, cu)
    assert torch.equal(out, ref), "selection differs from the reference"


@pytest.mark.parametrize("B,T,topk,chunk_bytes", [(1, 70, 8, None), (2, 40, 4, None), (1, 96, 8, 1)],
                         ids=["B1", "B2", "one-block-chunks"])
def test_topk_transient_bytes_is_what_the_kernel_allocates(B, T, topk, chunk_bytes, topk_mode, monkeypatch):
    """topk_transient_bytes (what parallel/memory.py charges a DSA layer's top-k) against the bytes of every tensor
    dsa_topk_triton and its helpers allocate beside the output, counted as they are made: before, the estimate
    charged the 1 GiB chunk bound whatever the shape (1.04 GiB for the tiny DSA model)."""
    from kernels.dsa import topk as tk
    from kernels.dsa.topk import TOPK_CHUNK_BYTES, dsa_topk_triton, topk_transient_bytes

    made = []
    here = {os.path.abspath(tk.__file__), os.path.abspath(inspect.getfile(row_doc_start))}

    def counted(fn):
        def make(*a, **k):
            t = fn(*a, **k)
            caller = inspect.stack()[1]
            if os.path.abspath(caller.filename) in here and caller.function != "_exact_fallback":
                made.append(t.numel() * t.element_size())
            return t
        return make

    for name in ("empty", "zeros", "arange"):
        monkeypatch.setattr(torch, name, counted(getattr(torch, name)))
    q, w, k = _int_indexer(B, T, 2, 16, -64, 65, w_lo=1)
    budget = TOPK_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    out = dsa_topk_triton(q, w, k, topk, chunk_bytes=budget)   # the exact fallback's rows, if any: not counted
    monkeypatch.undo()
    out_bytes = out.numel() * out.element_size()
    assert made.count(out_bytes) >= 1
    want = topk_transient_bytes(B, T, topk, chunk_bytes=budget, cfg=tk._config(torch.device(DEV)) | {
        "mode": topk_mode})
    assert sum(made) - out_bytes == want, (made, want)


def test_topk_all_ties_uses_exact_fallback(topk_mode):
    """All scores equal: every long row overflows its candidate list and is redone exactly;
    the answer is the first topk positions of the document."""
    B, T, topk = 1, 40, 8
    q = torch.zeros(B, T, 2, 16, device=DEV)
    w = torch.ones(B, T, 2, device=DEV)
    k = torch.randn(B, T, 16, device=DEV)
    stats = {}
    out = dsa_topk(q, w, k, topk, cap=16, num_samples=8, stats=stats)
    assert stats["fallback_rows"] == T - 16
    assert torch.equal(out, naive.topk_indices(q, w, k, topk))


@pytest.mark.parametrize("cap,m", [(None, None), (16, 8)])   # the defaults; rows past the candidate room
def test_topk_nan_scores_rank_last(topk_mode, cap, m):
    """A NaN in the indexer's inputs (a NaN activation) makes index scores NaN: they rank as -inf (naive.rank_topk),
    so every row still selects min(topk, eligible) keys of its own document, the NaN keys last in position order.
    Before, a row with fewer than topk non-NaN scores was left unwritten (positions of uninitialised memory, beyond
    the keys). Integer inputs: the other scores are exact, so the selection equals the reference's."""
    B, T, topk = 1, 100, 4
    cu = _cu(0, 9, 20, 31, 100)
    q, w, k = _int_indexer(B, T, 2, 16, -4, 5, w_lo=1)
    q[0, 24, 0, 0] = float("nan")      # every score of row 24 (document 2)
    w[0, 27, 1] = float("nan")         # every score of row 27
    k[0, [22, 40, 41, 45], 3] = float("nan")   # one key of document 2's and several of document 3's, for all rows
    ref = naive.topk_indices(q, w, k, topk, cu)
    out = dsa_topk(q, w, k, topk, cu_seqlens=cu, **({} if cap is None else {"cap": cap, "num_samples": m}))
    _check_idx_valid(out, topk, cu)
    assert torch.equal(out, ref), "selection differs from the reference"
    assert out[0, 24].tolist() == [20, 21, 22, 23] and out[0, 27].tolist() == [20, 21, 22, 23]
    # a NaN key never beats a scored one (row 23 has 4 eligible keys: it takes them all, key 22 too)
    assert not (out[0, [25, 26, 28, 29, 30]] == 22).any() and not (out[0, 46:] == 40).any()
    assert 22 in out[0, 23].tolist()


def test_topk_continuous_scores_are_a_valid_topk(topk_mode):
    """Random fp32 inputs: near-ties may resolve differently from the fp64 reference, so check
    that every selected score beats every unselected eligible score up to fp32 rounding."""
    B, T, HI, DI, topk = 1, 111, 4, 32, 12
    q, w, k = torch.randn(B, T, HI, DI, device=DEV), torch.rand(B, T, HI, device=DEV), \
        torch.randn(B, T, DI, device=DEV)
    out = dsa_topk(q, w, k, topk, cap=32, num_samples=16)
    _check_idx_valid(out, topk)
    s = naive.index_scores(q, w, k)
    elig = naive.eligible_mask(B, T, None, DEV)
    sel = naive.selection_mask(out, T)
    worst_sel = torch.where(sel, s, torch.full_like(s, float("inf"))).amin(-1)
    best_out = torch.where(elig & ~sel, s, torch.full_like(s, float("-inf"))).amax(-1)
    slack = 1e-5 * s.abs().amax()  # fp32 score rounding
    assert (worst_sel >= best_out - slack).all()


@pytest.mark.parametrize("B,cu", [(1, (0, 10, 24)), (2, None)])
def test_plan_builders_agree(B, cu):
    """The Triton union builders (sort per block; bitmaps) equal the torch reference builder, on
    packed documents and on several batch rows."""
    q, w, k = _int_indexer(B, 24, 2, 16)
    idx = naive.topk_indices(q, w, k, 4, None if cu is None else _cu(*cu))
    b = build_sparse_plan_torch(idx, 4)
    for kw in (dict(method="triton", merge=False), dict(method="bitmap")):  # full sort per block;
        a = build_sparse_plan(idx, 4, **kw)                                    # bitmaps
        assert torch.equal(a.offsets_N1, b.offsets_N1), kw
        assert torch.equal(a.pos_U, b.pos_U) and torch.equal(a.bits_U, b.bits_U), kw
    # every (token, key) selection is represented exactly once
    total = int((idx >= 0).sum())
    assert int(torch.tensor([bin(int(x)).count("1") for x in b.bits_U]).sum()) == total


@pytest.mark.parametrize("T,K,block_q", [(37, 16, 2), (30, 16, 8), (20, 8, 1)])
def test_plan_merge_of_sorted_rows(T, K, block_q):
    """The bitonic merge of each block's sorted rows gives the reference plan, including rows
    shorter than K (-1 padding), the ragged last block and block_q = 1 (nothing to merge)."""
    g = torch.Generator().manual_seed(T)
    idx = torch.full((1, T, K), -1, dtype=torch.int32)
    for t in range(T):
        n = min(K, t + 1)
        idx[0, t, :n] = torch.randperm(t + 1, generator=g)[:n].sort().values.int()
    b = build_sparse_plan_torch(idx, block_q)
    # one merge per block into padded slots: one chunk of slots, then chunks of 3 blocks (a ragged
    # last chunk, packed output concatenated); the two-merge (count, then write) builder; and the
    # bitmap builder, in one chunk and in chunks of one block
    for kw in (dict(), dict(chunk_bytes=3 * 8 * block_q * K), dict(one_pass=False),
               dict(method="bitmap"), dict(method="bitmap", chunk_bytes=1)):
        a = build_sparse_plan(idx.to(DEV), block_q, **{"method": "triton", "merge": True, **kw})
        assert torch.equal(a.offsets_N1.cpu(), b.offsets_N1), kw
        assert torch.equal(a.pos_U.cpu(), b.pos_U) and torch.equal(a.bits_U.cpu(), b.bits_U), kw


@pytest.mark.parametrize("method", ["torch", "triton", "bitmap"])
def test_plan_of_query_subset(method):
    """Query rows that select among more keys than there are rows (a context-parallel rank's rows
    hold global key positions), built with n_keys: every builder gives the plan that per-block
    Python sets give, in one chunk and in chunks of one block (the bitmap builder must size its
    bitmaps by the keys and end each walk at the block's largest position, not its last row)."""
    R, NK, K, bq = 21, 90, 8, 4
    g = torch.Generator().manual_seed(5)
    idx = torch.full((1, R, K), -1, dtype=torch.int32)
    for r in range(R):
        t = 40 + 2 * r                      # the row's global position; it selects keys <= t
        n = K if r % 5 else 3               # some rows shorter than K (-1 padding)
        idx[0, r, :n] = torch.randperm(t + 1, generator=g)[:n].sort().values.int()
    offsets, pos, bits = [0], [], []
    for b0 in range(0, R, bq):
        union = {}
        for i, r in enumerate(range(b0, min(b0 + bq, R))):
            for x in idx[0, r].tolist():
                if x >= 0:
                    union[x] = union.get(x, 0) | (1 << i)
        pos += sorted(union)
        bits += [union[x] for x in sorted(union)]
        offsets.append(len(pos))
    assert max(pos) >= 64  # beyond the 21 rows and the one 32-position bitmap word they would size
    for kw in (dict(), dict(chunk_bytes=1)):
        a = build_sparse_plan(idx.to(DEV), bq, method=method, n_keys=NK, **kw)
        assert a.offsets_N1.tolist() == offsets, kw
        assert a.pos_U.tolist() == pos and a.bits_U.tolist() == bits, kw
        assert (a.T, a.max_doc_len) == (R, NK)
    with pytest.raises(ValueError, match=f"key position {max(pos)}, beyond the {R} key rows"):
        build_sparse_plan_torch(idx, bq)  # without n_keys the rows bound the positions
    with pytest.raises(ValueError, match="with n_keys"):
        build_sparse_plan(idx, bq, n_keys=NK, cu_seqlens=torch.tensor([0, R], dtype=torch.int32))


@pytest.mark.parametrize("method", ["torch", "triton", "bitmap"])
def test_plan_rejects_positions_beyond_the_keys(method):
    """A position at or beyond n_keys (no such K / V row) stops every builder with an error naming
    it, instead of a plan that sends the attention kernels past the end of K and V. The bitmap
    builder finds it in the host sync that already reads each chunk's offsets: the bad row sits in
    the last block, so in chunks of one block only the last chunk holds it. A bitmap word covers
    32 positions, so 37 (inside the word that holds key 33) must be caught as well as 40."""
    R, NK, K, bq = 12, 34, 4, 4
    idx = torch.arange(K, dtype=torch.int32).repeat(1, R, 1)  # every row selects keys 0..3
    for bad in (NK, 37, 40):
        idx_bad = idx.clone()
        idx_bad[0, R - 1, K - 1] = bad
        for kw in (dict(), dict(chunk_bytes=1)):
            with pytest.raises(ValueError, match=f"key position {bad}, beyond the {NK} key rows"):
                build_sparse_plan(idx_bad.to(DEV), bq, method=method, n_keys=NK, **kw)
    assert build_sparse_plan(idx.to(DEV), bq, method=method, n_keys=NK).pos_U.numel() == 3 * K


# ----------------------------------------------------------------------------- sparse attention

ATTN_CASES = [
    # B, T, Hq, Hkv, D, topk, block_q, cu_seqlens bounds
    pytest.param(2, 63, 4, 2, 32, 8, None, None, id="T63"),
    pytest.param(1, 111, 6, 2, 16, 16, 4, (0, 40, 41, 111), id="T111-G3-packed"),
    pytest.param(1, 40, 4, 2, 16, 1, 1, None, id="topk1-blockq1"),
    pytest.param(1, 40, 4, 2, 16, 64, None, None, id="topk-larger-than-T"),
    pytest.param(1, 1000, 4, 2, 32, 16, None, None, id="T1000"),
]


def _selection(B, T, topk, cu):
    q, w, k = _int_indexer(B, T, 2, 16)
    return naive.topk_indices(q, w, k, topk, cu)


@pytest.mark.parametrize("B,T,Hq,Hkv,D,topk,block_q,cu", ATTN_CASES)
def test_sparse_attention_fwd_bwd(B, T, Hq, Hkv, D, topk, block_q, cu):
    if DEV == "cuda" and block_q and block_q * (Hq // Hkv) < 16:
        pytest.skip("compiled tl.dot needs >= 16 query rows per program (block_q x group)")
    cu = None if cu is None else _cu(*cu)
    idx = _selection(B, T, topk, cu)
    q = torch.randn(B, T, Hq, D, device=DEV)
    k = torch.randn(B, T, Hkv, D, device=DEV)
    v = torch.randn(B, T, Hkv, D, device=DEV)
    do = torch.randn(B, T, Hq, D, device=DEV)
    scale = D ** -0.5
    plan = build_sparse_plan(idx, block_q or default_block_q(Hq, Hkv))
    o = poison_(torch.empty_like(q))
    lse = poison_(torch.empty(B, T, Hq, device=DEV))
    sparse_attn_fwd(q, k, v, plan, scale, o=o, lse=lse)
    dq, dk, dv = sparse_attn_bwd(q, k, v, o, do, lse, plan, scale, dq=poison_(torch.empty_like(q)))

    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = naive.sparse_gqa_attention(qr, kr, vr, idx, scale)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do)
    assert_close("o", o_ref, o, TOL_OUT)
    assert_close("lse", lse_ref, lse, TOL_OUT)
    assert_close("dv", dv_ref, dv, TOL_GRAD)
    if topk == 1:  # one key per query: softmax is constant, dq = dk = 0 up to fp32 rounding
        assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5
    else:
        assert_close("dq", dq_ref, dq, TOL_GRAD)
        assert_close("dk", dk_ref, dk, TOL_GRAD)


def test_sparse_attention_autograd_api():
    """The public autograd path (plan built inside) matches the reference, and the naive backend."""
    B, T, Hq, Hkv, D = 1, 47, 4, 2, 16
    idx = _selection(B, T, 8, None)
    q, k, v = (torch.randn(B, T, h, D, device=DEV, requires_grad=True) for h in (Hq, Hkv, Hkv))
    o = sparse_gqa_attention(q, k, v, idx)
    g = torch.autograd.grad(o.square().sum(), (q, k, v))
    o_ref = sparse_gqa_attention(q, k, v, idx, backend="naive")
    g_ref = torch.autograd.grad(o_ref.square().sum(), (q, k, v))
    assert_close("o", o_ref, o, TOL_OUT)
    for name, a, b in zip(("dq", "dk", "dv"), g_ref, g):
        assert_close(name, a, b, TOL_GRAD)


def test_backward_register_cap_follows_the_longest_document(monkeypatch):
    """The attention backward's launch settings see the longest packed document, not the packed
    length: the plan records it from cu_seqlens, and _config caps registers (three programs per SM)
    only for 16-bit inputs whose documents are at most 64K tokens (measured on an H200: faster up to
    64K, slower at 128K; bench/RESULTS.md). The rule is checked as the GPU would apply it."""
    from kernels.dsa import sparse_attn as sa
    B, T, Hq, Hkv, D = 1, 47, 4, 2, 16
    cu = _cu(0, 9, 30, 47)
    idx = _selection(B, T, 8, cu)
    assert build_sparse_plan(idx, 4, cu_seqlens=cu).max_doc_len == 21
    assert build_sparse_plan(idx, 4).max_doc_len == T
    seen = []
    config = sa._config
    monkeypatch.setattr(sa, "_config", lambda *a, **kw: seen.append(a) or config(*a, **kw))
    q, k, v = (torch.randn(B, T, h, D, device=DEV, requires_grad=True) for h in (Hq, Hkv, Hkv))
    o = sparse_gqa_attention(q, k, v, idx, cu_seqlens=cu)
    torch.autograd.grad(o.sum(), (q, k, v))
    assert seen[-1][-1] == 21  # the backward's call: span = the 21-token document
    monkeypatch.setattr(sa, "interpreting", lambda: False)
    gpu = torch.device("cuda")
    assert config(gpu, 32, 128, 2, 65536)["maxnreg_bwd"] == 168
    assert config(gpu, 32, 128, 2, 65537)["maxnreg_bwd"] is None
    assert config(gpu, 32, 128, 2, None)["maxnreg_bwd"] is None
    assert config(gpu, 32, 128, 4, 4096)["maxnreg_bwd"] is None  # fp32 inputs: not measured


# ----------------------------------------------------------------------------- indexer KL losses

LOSS_CASES = [
    # B, T, Hq, Hkv, D, HI, DI, topk, cu_seqlens bounds
    pytest.param(2, 63, 4, 2, 32, 4, 16, 8, None, id="T63"),
    pytest.param(1, 111, 6, 2, 16, 2, 16, 16, (0, 40, 41, 111), id="T111-G3-packed"),
    pytest.param(1, 63, 4, 4, 16, 2, 16, 1, None, id="topk1"),
]


def _loss_inputs(B, T, Hq, Hkv, D, HI, DI):
    q = torch.randn(B, T, Hq, D, device=DEV)
    k = torch.randn(B, T, Hkv, D, device=DEV)
    qi = torch.randn(B, T, HI, DI, device=DEV) * 0.5
    w = torch.randn(B, T, HI, device=DEV)
    ki = torch.randn(B, T, DI, device=DEV) * 0.5
    return q, k, qi, w, ki


def _check_sparse_loss(q, k, qi, w, ki, idx, lse, cu, plan, split=None, chunk_bytes=None):
    """indexer_loss.py's forward and both backwards against the reference's loss and autograd."""
    B, T = q.shape[:2]
    scale = q.shape[-1] ** -0.5
    outs = [poison_(torch.empty(B * T, device=DEV)) for _ in range(3)]
    kl, lse_i, z, psum = indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale, *outs, keep_psum=True,
                                        split=split, chunk_bytes=chunk_bytes)
    gscale = torch.full((1,), 1.0 / (B * T), device=DEV)
    qir, wr, kir = (x.clone().requires_grad_() for x in (qi, w, ki))
    ref = naive.indexer_kl_loss(q, k, qir, wr, kir, "sparse", idx_BTK=idx, lse_BTH=lse, scale=scale,
                                cu_seqlens=cu)
    g_ref = torch.autograd.grad(ref, (qir, wr, kir))
    # the per-token KL is A/Z - log Z - B/Z + lse_I: with one selected key every term cancels to 0
    # exactly in float64, while compiled fp32 log / exp leave ~1e-7 per term, so a KL near 0 is
    # compared on the scale of its terms (log of the head-summed mass, >= 1) rather than of itself
    ref = ref.detach()
    err = abs(float(kl.double().mean()) - float(ref))
    assert err <= TOL_OUT * max(abs(float(ref)), 1.0), f"loss {float(kl.double().mean())} vs {float(ref)}"
    assert torch.isfinite(kl).all() and torch.isfinite(lse_i).all() and torch.isfinite(z).all()
    # backward recomputing P from q, k, lse, and reading the forward's cached P
    for cached in (False, True):
        dqi, dw, dki = indexer_kl_bwd(qi, w, ki, q, k, lse, plan, scale, lse_i, z,
                                      gscale, dq_idx=poison_(torch.empty_like(qi)),
                                      dw=poison_(torch.empty_like(w)),
                                      psum=psum if cached else None)
        for name, a, b in zip(("dq_idx", "dw", "dk_idx"), g_ref, (dqi, dw, dki)):
            if a.abs().max() < 1e-12:  # one key per token: dKL/dI = softmax - p = 1 - 1 = 0, and the
                # kernel's P / Z rounds to 1 +- 1 ulp (fp32), times 1 / (B*T) and the indexer inputs
                assert torch.isfinite(b).all() and b.abs().max() < 1e-6, f"{name}: {b.abs().max()}"
            else:
                assert_close(f"sparse {name} cached={cached}", a, b, TOL_GRAD)


@pytest.mark.parametrize("split,chunk_bytes", [(True, None), (True, 512), (False, None)],
                         ids=["split", "split-chunks", "fused"])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,HI,DI,topk,cu", LOSS_CASES)
def test_indexer_loss_sparse(B, T, Hq, Hkv, D, HI, DI, topk, cu, split, chunk_bytes):
    """split: the forward's head-summed P from one launch per KV group into an fp32 buffer (with
    512-byte chunks: many chunks of a few blocks, the last one ragged), or one fused kernel."""
    cu = None if cu is None else _cu(*cu)
    q, k, qi, w, ki = _loss_inputs(B, T, Hq, Hkv, D, HI, DI)
    idx = _selection(B, T, topk, cu)
    _, lse = naive.sparse_gqa_attention(q, k, k, idx)  # the sparse attention's lse
    _check_sparse_loss(q, k, qi, w, ki, idx, lse, cu, build_sparse_plan(idx, default_block_q(Hq, Hkv)),
                       split, chunk_bytes)


DENSE_TILE_CASES = [
    # B, T, cu_seqlens bounds, rows without keys (a context-parallel rank's rows it does not hold),
    # chunk budget in bytes (small: many row chunks, the last one ragged)
    pytest.param(2, 63, None, None, None, id="T63-B2"),
    pytest.param(1, 111, (0, 40, 41, 111), None, 4096, id="T111-packed-chunks"),
    pytest.param(1, 100, (0, 37, 100), (0, 25, 75, 100), 8192, id="T100-cp-rows"),
]


@pytest.mark.parametrize("B,T,cu,held,chunk_bytes", DENSE_TILE_CASES)
def test_dense_stage_kl_on_wide_tiles(B, T, cu, held, chunk_bytes):
    """indexer_loss_dense.dense_kl_fwd_bwd (token x key tiles, d staged per row chunk, dk_idx
    key-major) against the float64 reference's KL and autograd gradients. `held`: only the rows in
    [held[0], held[1]) and [held[2], held[3]) have keys, as a context-parallel rank scatters its rows
    (the others get start = row + 1); the reference is then the sum over the held rows only."""
    from kernels.dsa import indexer_loss_dense as ild
    from kernels.dsa.indexer_loss_dense import dense_kl_fwd_bwd
    Hq, Hkv, D, HI, DI = 6, 2, 16, 3, 16  # G = 3 and HI = 3: padded head counts
    cu_t = None if cu is None else _cu(*cu)
    q, k, qi, w, ki = _loss_inputs(B, T, Hq, Hkv, D, HI, DI)
    scale = D ** -0.5
    start = row_doc_start(B, T, cu_t, q.device)
    keep = torch.ones(T, dtype=torch.bool, device=DEV)
    if held is not None:
        pos = torch.arange(T, device=DEV)
        keep = ((pos >= held[0]) & (pos < held[1])) | ((pos >= held[2]) & (pos < held[3]))
        start = torch.where(keep, start, (pos + 1).to(torch.int32))
    lse = ild.dense_attention_lse(q, k, scale, start)
    lse_ref = naive.dense_lse(q, k, scale, cu_t).reshape(-1, q.shape[2])
    lse_ref = torch.where(keep.repeat(B)[:, None], lse_ref, float("-inf"))
    assert torch.equal(lse.reshape(-1, q.shape[2]).isinf(), lse_ref.isinf())
    assert_close("dense lse (tiles)", lse_ref.nan_to_num(neginf=0.0), lse.reshape(lse_ref.shape).nan_to_num(neginf=0.0),
                 TOL_OUT)
    grad = 2.5
    gscale = torch.full((1,), grad / (B * T), device=DEV)
    cfg = None if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    kl, (dqi, dw, dki) = dense_kl_fwd_bwd(qi, w, ki, q, k, lse, start, scale, gscale, cfg=cfg)
    kl_only, none = dense_kl_fwd_bwd(qi, w, ki, q, k, lse, start, scale, None, cfg=cfg)
    assert none is None and torch.equal(kl, kl_only)
    qir, wr, kir = (x.clone().double().requires_grad_() for x in (qi, w, ki))
    # the reference's own pieces, with the rows not held given no keys
    mask = naive.eligible_mask(B, T, cu_t, q.device) & keep.view(1, T, 1)
    p = naive.attention_target(q, k, mask, scale)
    logq = torch.log_softmax(naive.index_scores(qir, wr, kir).masked_fill(~mask, float("-inf")), -1)
    ref_tok = torch.where(mask, torch.xlogy(p, p) - p * torch.where(mask, logq, 0.0), 0.0).sum(-1)
    g_ref = torch.autograd.grad(ref_tok.sum() * grad / (B * T), (qir, wr, kir))
    assert_close("dense KL per token", ref_tok.reshape(-1), kl, TOL_OUT)
    assert (kl[~keep.repeat(B)] == 0).all()
    for name, a, b in zip(("dq_idx", "dw", "dk_idx"), g_ref, (dqi, dw, dki)):
        assert_close(f"dense {name}", a, b, TOL_GRAD)
    if held is not None:
        # told which rows have keys, the row chunks without any are not launched (the CP path's
        # `rows`); the results stay those of the reference, zeros included for the rows left out
        rows = [(held[0], held[1]), (held[2], held[3])]
        budget = max(1, ild._config(q.device)["chunk_bytes"] if chunk_bytes is None else chunk_bytes) // 4
        step = 16  # lcm of the interpreter's BM_d, BQ_dq, BQ_dk
        walked = ild._row_chunks(T, step, budget, rows)
        assert len(walked) < len(ild._row_chunks(T, step, budget))
        assert all(any(a <= r0 and r1 <= b for a, b in rows) for r0, r1 in walked)
        kl_r, grads_r = dense_kl_fwd_bwd(qi, w, ki, q, k, lse, start, scale, gscale, cfg=cfg, rows=rows)
        assert_close("dense KL per token (rows)", ref_tok.reshape(-1), kl_r, TOL_OUT)
        assert (kl_r[~keep.repeat(B)] == 0).all()
        for name, a, b in zip(("dq_idx", "dw", "dk_idx"), g_ref, grads_r):
            assert_close(f"dense {name} (rows)", a, b, TOL_GRAD)
        with pytest.raises(ValueError, match="rows must be ascending"):
            dense_kl_fwd_bwd(qi, w, ki, q, k, lse, start, scale, gscale, cfg=cfg, rows=rows[::-1])


def test_indexer_loss_dense_api_autograd(monkeypatch):
    """The public dense-stage loss through autograd (indexer_loss_dense.DenseKLLossFn: the forward takes
    the gradients with the KL, the backward scales them) against the reference, on packed documents
    whose bounds cut the tiles; without an input that requires grad the forward takes none."""
    from kernels.dsa import indexer_loss_dense as ild
    B, T, Hq, Hkv, D, HI, DI = 1, 45, 4, 2, 16, 2, 16
    cu = _cu(0, 13, 14, 45)
    q, k, qi, w, ki = _loss_inputs(B, T, Hq, Hkv, D, HI, DI)
    qi.requires_grad_()
    ki.requires_grad_()
    loss = indexer_kl_loss(q, k, qi, w, ki, stage="dense", cu_seqlens=cu)
    ref = indexer_kl_loss(q, k, qi, w, ki, stage="dense", cu_seqlens=cu, backend="naive")
    assert_close("dense loss", ref.detach().reshape(1), loss.detach().reshape(1), TOL_OUT)
    for name, a, b in zip(("dq_idx", "dk_idx"), torch.autograd.grad(ref * 3.0, (qi, ki)),
                          torch.autograd.grad(loss * 3.0, (qi, ki))):
        assert_close(f"dense {name}", a, b, TOL_GRAD)
    seen = []
    real = ild.dense_kl_fwd_bwd
    monkeypatch.setattr(ild, "dense_kl_fwd_bwd", lambda *a, **kw: seen.append(a[8] if len(a) > 8 else kw.get("gscale"))
                        or real(*a, **kw))
    with torch.no_grad():
        again = indexer_kl_loss(q, k, qi, w, ki, stage="dense", cu_seqlens=cu)
    assert seen == [None] and float(again) == float(loss.detach())


@pytest.mark.parametrize("cu", [None, (0, 13, 14, 45)])
def test_indexer_loss_backward_now_equals_the_autograd_loss(cu):
    """indexer_kl_loss_backward_now (the dense stage's loss and its backward at once: the indexer's lse
    first, then one pass that takes the gradients and the KL from the P and I it computes, with the
    target's mass Z = Hq) against the reference's autograd, with w frozen (its gradient must not be
    delivered); the returned loss is detached."""
    from kernels.dsa import indexer_kl_loss_backward_now
    B, T, Hq, Hkv, D, HI, DI = 1, 45, 4, 2, 16, 2, 16
    cu = None if cu is None else _cu(*cu)
    q, k, qi, w, ki = _loss_inputs(B, T, Hq, Hkv, D, HI, DI)
    grad = 3.0
    qir, kir = qi.clone().requires_grad_(), ki.clone().requires_grad_()
    ref = indexer_kl_loss(q, k, qir, w, kir, stage="dense", cu_seqlens=cu, backend="naive")
    (ref * grad).backward()
    qit, kit = qi.clone().requires_grad_(), ki.clone().requires_grad_()
    wt = w.clone()
    loss = indexer_kl_loss_backward_now(q, k, qit, wt, kit, grad=grad, cu_seqlens=cu)
    assert not loss.requires_grad and wt.grad is None
    assert_close("loss", ref.detach().reshape(1), loss.reshape(1), TOL_OUT)
    assert_close("dq_idx", qir.grad, qit.grad, TOL_GRAD)
    assert_close("dk_idx", kir.grad, kit.grad, TOL_GRAD)


def test_indexer_loss_sparse_T1000():
    B, T, Hq, Hkv, D, HI, DI, topk = 1, 1000, 4, 2, 16, 2, 16, 16
    q, k, qi, w, ki = _loss_inputs(B, T, Hq, Hkv, D, HI, DI)
    idx = _selection(B, T, topk, None)
    _, lse = naive.sparse_gqa_attention(q, k, k, idx)
    _check_sparse_loss(q, k, qi, w, ki, idx, lse, None, build_sparse_plan(idx, 16))


def test_indexer_loss_api_and_composition():
    """Public autograd API (lse computed internally when absent) and dsa_attention vs naive."""
    B, T, Hq, Hkv, D, HI, DI = 1, 37, 4, 2, 16, 2, 16
    q, k, qi, w, ki = _loss_inputs(B, T, Hq, Hkv, D, HI, DI)
    v = torch.randn_like(k)
    qi.requires_grad_()
    for stage in ("dense", "sparse"):
        idx = _selection(B, T, 8, None) if stage == "sparse" else None
        loss = indexer_kl_loss(q, k, qi, w, ki, stage=stage, idx=idx)
        ref = indexer_kl_loss(q, k, qi, w, ki, stage=stage, idx=idx, backend="naive")
        assert_close(f"{stage} loss", ref.detach().reshape(1), loss.detach().reshape(1), TOL_OUT)
        assert_close(f"{stage} dq_idx", torch.autograd.grad(ref, qi)[0],
                     torch.autograd.grad(loss, qi)[0], TOL_GRAD)
    qi = qi.detach().round()  # integer-valued indexer: exact selection on both backends
    ki = ki.round()
    w = w.round()
    # the attention and the loss share one union plan here (block_q 16 for both); the gradients of
    # both, through dsa_attention, against the reference
    dout = torch.randn(B, T, Hq, D, device=DEV)
    grads = []
    for backend in ("triton", "naive"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, qi, w, ki)]
        o, loss, idx = dsa_attention(*xs, topk=8, backend=backend)
        grads.append((o.detach(), loss.detach(), idx, torch.autograd.grad((o * dout).sum() + 0.5 * loss, xs)))
    (o, loss, idx, g), (o_r, loss_r, idx_r, g_r) = grads
    assert torch.equal(idx, idx_r)
    assert_close("o", o_r, o, TOL_OUT)
    assert_close("loss", loss_r.reshape(1), loss.reshape(1), TOL_OUT)
    for name, a, b in zip(("dq", "dk", "dv", "dq_idx", "dw", "dk_idx"), g_r, g):
        assert_close(f"dsa_attention {name}", a, b, TOL_GRAD)


KL_IN_BACKWARD_CASES = [
    # B, T, Hq, Hkv, D, HI, DI, topk, cu_seqlens bounds, chunk budget (bytes of fp32 P; small: many chunks)
    pytest.param(2, 63, 4, 2, 32, 4, 16, 8, None, None, id="T63-B2"),
    pytest.param(1, 111, 6, 2, 16, 2, 16, 16, (0, 40, 41, 111), 1024, id="T111-G3-packed-chunks"),
    pytest.param(1, 63, 4, 4, 16, 2, 16, 1, None, None, id="topk1"),
    pytest.param(1, 40, 4, 2, 16, 2, 16, 64, None, 512, id="topk-larger-than-T-chunks"),
]


@pytest.mark.parametrize("B,T,Hq,Hkv,D,HI,DI,topk,cu,chunk_bytes", KL_IN_BACKWARD_CASES)
def test_dsa_attention_kl_in_backward(B, T, Hq, Hkv, D, HI, DI, topk, cu, chunk_bytes, monkeypatch):
    """kl_in_backward (kernels/dsa/fused.py): the attention backward sums its recomputed probabilities into
    the KL's target, chunk by chunk of blocks, and the KL kernels train the indexer from it. Against the
    float64 reference: o, the KL (NaN until the backward fills it) and all six gradients of
    o . dout + weight * KL, with the weight applied whatever gradient reaches o."""
    from kernels.dsa import indexer_loss
    if chunk_bytes is not None:
        monkeypatch.setattr(indexer_loss, "LOSS_CHUNK_BYTES", chunk_bytes)
    cu = None if cu is None else _cu(*cu)
    q, k, qi, w, ki = _loss_inputs(B, T, Hq, Hkv, D, HI, DI)
    qi, w, ki = qi.round(), w.round(), ki.round()  # integer-valued indexer: exact selection on both backends
    v = torch.randn_like(k)
    dout = torch.randn(B, T, Hq, D, device=DEV)
    weight = 0.7
    res = {}
    for backend in ("triton", "naive"):
        xs = [x.detach().clone().double() if backend == "naive" else x.detach().clone()
              for x in (q, k, v, qi, w, ki)]
        xs = [x.requires_grad_() for x in xs]
        o, kl, idx = dsa_attention(*xs, topk=topk, cu_seqlens=cu, backend=backend, kl_in_backward=weight)
        if backend == "triton":
            assert kl.dim() == 0 and torch.isnan(kl), "the KL exists only after the backward"
        g = torch.autograd.grad(o, xs, dout.to(o.dtype))
        res[backend] = (o.detach(), kl.detach(), idx, g)
    (o, kl, idx, g), (o_r, kl_r, idx_r, g_r) = res["triton"], res["naive"]
    assert torch.equal(idx, idx_r)
    _check_idx_valid(idx, topk, cu)
    assert_close("o", o_r, o, TOL_OUT)
    # one selected key per token (topk 1): every KL term cancels to 0 in float64, fp32 leaves ~1e-7
    assert abs(float(kl) - float(kl_r)) <= TOL_OUT * max(abs(float(kl_r)), 1.0), (float(kl), float(kl_r))
    for name, a, b in zip(("dq", "dk", "dv", "dq_idx", "dw", "dk_idx"), g_r, g):
        if a.abs().max() < 1e-12:  # topk 1: softmax over one key is constant (dq, dk and the indexer's: 0)
            assert torch.isfinite(b).all() and b.abs().max() < 1e-5, f"{name}: {b.abs().max()}"
        else:
            assert_close(f"kl_in_backward {name}", a, b, TOL_GRAD)
    # the same through the split kernels (a loss forward, then its own backward): the same gradients
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, qi, w, ki)]
    o2, kl2, _ = dsa_attention(*xs, topk=topk, cu_seqlens=cu)
    g2 = torch.autograd.grad((o2 * dout).sum() + weight * kl2, xs)
    assert abs(float(kl2.detach()) - float(kl)) <= 1e-6 * max(abs(float(kl2)), 1.0)
    for name, a, b in zip(("dq", "dk", "dv", "dq_idx", "dw", "dk_idx"), g2, g):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"split vs kl_in_backward {name}"


class _Atomics:
    """Counts the atomic read-modify-writes the interpreted kernels issue while active: `n` the fp32 ones, `n_int64`
    the int64 ones (the deterministic backward's fixed-point sums; the plan's int32 OR / max are in neither). The
    interpreter runs programs one after another, so a run here cannot show nondeterminism itself; what it shows is
    that no fp32 sum is left to the order of atomics, and that every contribution reaches its key (the gradients
    match the reference)."""

    def __init__(self, monkeypatch):
        import triton.runtime.interpreter as ti
        self.n, self.n_int64, self.on = 0, 0, False
        real = ti.interpreter_builder.create_atomic_rmw

        def rmw(op, ptr, val, mask, sem, scope):
            if self.on and val.data.dtype.kind == "f":
                self.n += 1
            if self.on and val.data.dtype.kind == "i" and val.data.dtype.itemsize == 8:
                self.n_int64 += 1
            return real(op, ptr, val, mask, sem, scope)

        monkeypatch.setattr(ti.interpreter_builder, "create_atomic_rmw", rmw)


@pytest.fixture
def _torch_deterministic():
    """torch's deterministic algorithms on (train.deterministic's switch, process-wide), restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _det_inputs(B, T, seed=0):
    """Small DSA inputs with an integer-valued indexer (exact selection on both backends)."""
    torch.manual_seed(seed)
    Hq, Hkv, D, HI, DI = 4, 2, 16, 2, 16
    q, k, qi, w, ki = _loss_inputs(B, T, Hq, Hkv, D, HI, DI)
    return q, k, torch.randn_like(k), qi.round(), w.round(), ki.round(), torch.randn(B, T, Hq, D, device=DEV)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="counts atomics in the interpreter")
@pytest.mark.parametrize("B,T,cu", [(1, 45, (0, 17, 18, 45)), (2, 23, None)], ids=["T45-packed", "B2-T23"])
def test_deterministic_backward_without_float_atomics(B, T, cu, monkeypatch, _torch_deterministic):
    """With torch's deterministic algorithms on, the sparse stage's Triton backward (attention + KL in one node,
    and the split attention / loss nodes) sums dk, dv, the head-summed P and dk_idx in int64 fixed point with
    integer atomics: no fp32 atomic in any kernel, and the six gradients and the KL equal the float64 reference
    (tolerances as above: the fixed-point resolution, about 1e-18 of each sum's bound, is far below fp32's
    rounding), packed documents or two batch rows, odd T, P's chunks of a few blocks.
    The chunking of P does not change a sum: 2 KB chunks give bit-identical results to one chunk. With the mode
    off the same backward adds with fp32 atomics (the counter sees them)."""
    from kernels.dsa import fused
    topk, weight = 8, 0.7
    cu = None if cu is None else _cu(*cu)
    q, k, v, qi, w, ki, dout = _det_inputs(B, T)
    atomics = _Atomics(monkeypatch)

    default_chunk = fused.LOSS_CHUNK_BYTES

    def run(backend, fused_kl=True, chunk=None, det=True):
        monkeypatch.setattr(fused, "LOSS_CHUNK_BYTES", chunk or default_chunk)
        torch.use_deterministic_algorithms(det)
        xs = [x.detach().clone().double() if backend == "naive" else x.detach().clone() for x in (q, k, v, qi, w, ki)]
        xs = [x.requires_grad_() for x in xs]
        o, kl, _ = dsa_attention(*xs, topk=topk, cu_seqlens=cu, backend=backend,
                                 kl_in_backward=weight if fused_kl else None)
        atomics.n, atomics.n_int64, atomics.on = 0, 0, True
        g = torch.autograd.grad(o, xs, dout.to(o.dtype)) if fused_kl else \
            torch.autograd.grad((o * dout).sum() + weight * kl, xs)
        atomics.on = False
        return (atomics.n, atomics.n_int64), float(kl.detach()), g

    _, kl_r, g_r = run("naive")
    names = ("dq", "dk", "dv", "dq_idx", "dw", "dk_idx")
    res = {}
    for fused_kl in (True, False):
        (n, n_int), kl, g = res[fused_kl] = run("triton", fused_kl, chunk=2048)
        assert n == 0 and n_int > 0, f"fused={fused_kl}: {n} fp32 atomics, {n_int} int64 ones"
        assert abs(kl - kl_r) <= TOL_OUT * max(abs(kl_r), 1.0), (kl, kl_r)
        for name, a, b in zip(names, g_r, g):
            assert_close(f"deterministic fused={fused_kl} {name}", a, b, TOL_GRAD)
    if B > 1:  # two batch rows: their keys kept apart; the checks below once, on the packed case
        return
    _, kl, g = res[True]
    (n1, _), kl1, g1 = run("triton", chunk=1 << 30)  # one chunk of P: the same sums
    assert n1 == 0 and kl1 == kl
    for name, a, b in zip(names, g, g1):
        assert torch.equal(a, b), f"{name} depends on the chunking"
    (n_atomic, _), _, _ = run("triton", det=False)
    assert n_atomic > 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="runs the blocks in an order of its own")
def test_deterministic_sums_do_not_depend_on_the_order_of_the_adds():
    """What makes the backward deterministic on a GPU, whose programs add in any order: the int64 fixed-point sums of
    dk / dv are the same bits when the blocks run in the opposite order (one launch per block, last block first),
    where the fp32 atomics' sums of the same contributions are not (so the check can tell)."""
    from kernels.dsa.sparse_attn import attn_bwd_fixed_point_scales, sparse_attn_bwd_blocks
    B, T = 1, 61
    q, k, v, qi, w, ki, dout = _det_inputs(B, T, seed=3)
    idx = dsa_topk(qi, w, ki, topk=16, backend="naive")
    plan = build_sparse_plan(idx, block_q=default_block_q(q.shape[2], k.shape[2]))
    scale = q.shape[-1] ** -0.5
    o, lse = sparse_attn_fwd(q, k, v, plan, scale)
    fix = attn_bwd_fixed_point_scales(q, k, v, o, dout, scale)

    def sums(dtype, order):
        dk, dv = (torch.zeros(k.shape, dtype=dtype) for _ in range(2))
        for b in order:
            sparse_attn_bwd_blocks(q, k, v, o, dout, lse, plan, scale, torch.empty_like(q), dk, dv, blocks=(b, b + 1),
                                   fix=fix if dtype == torch.int64 else None)
        return dk, dv

    order = list(range(plan.num_blocks))
    for dtype, same in ((torch.int64, True), (torch.float32, False)):
        (dk1, dv1), (dk2, dv2) = sums(dtype, order), sums(dtype, order[::-1])
        assert (torch.equal(dk1, dk2) and torch.equal(dv1, dv2)) == same, dtype


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1", reason="the interpreter's fp32 path")
@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_deterministic_backward_scales_with_the_gradients(magnitude, _torch_deterministic):
    """The fixed-point scale follows the gradients' size (a bound taken from the inputs): an output gradient of
    1e30 neither overflows int64 nor, at 1e-30, drowns in the resolution; both match the float64 reference at the
    usual tolerance. A NaN in an input makes every value of the sums it enters NaN (fp32 atomics give NaN where it
    reaches), not a wrapped integer: one in v enters dk (through dO.v) and not dv (P^T dO)."""
    B, T = 1, 40
    q, k, v, qi, w, ki, dout = _det_inputs(B, T, seed=5)
    dout = dout * magnitude
    idx = dsa_topk(qi, w, ki, topk=8, backend="naive")
    plan = build_sparse_plan(idx, block_q=default_block_q(q.shape[2], k.shape[2]))
    scale = q.shape[-1] ** -0.5
    o, lse = sparse_attn_fwd(q, k, v, plan, scale)
    dq, dk, dv = sparse_attn_bwd(q, k, v, o, dout, lse, plan, scale)
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    o_r, _ = naive.sparse_gqa_attention(*xs, idx, scale)
    g_r = torch.autograd.grad(o_r, xs, dout.double())
    for name, a, b in zip(("dq", "dk", "dv"), g_r, (dq, dk, dv)):
        assert_close(f"{name} at {magnitude:g}", a / magnitude, b / magnitude, TOL_GRAD)
    v_nan = v.clone()
    v_nan[0, 3, 1, 0] = float("nan")
    with warnings.catch_warnings():  # the interpreter's numpy warns as the NaN contributions are cast to int64
        warnings.simplefilter("ignore", RuntimeWarning)
        _, dk_nan, dv_nan = sparse_attn_bwd(q, k, v_nan, o, dout, lse, plan, scale)
    assert torch.isnan(dk_nan).all() and torch.equal(dv_nan, dv)


def test_dsa_attention_reads_packed_bounds_once(monkeypatch):
    """With packed documents, dsa_attention copies cu_seqlens to the host once (a GPU sync per
    layer): validate_cu_seqlens returns the longest document, which the plan's launch setting
    needs, so neither the top-k nor the plan builder reads cu_seqlens again. Every kernels.dsa
    module's copy of the reader is replaced, so a re-added call anywhere fails here."""
    import sys
    from kernels.dsa import common
    from kernels.dsa import sparse_attn as sa
    calls, seen = [], []
    check, config = common.validate_cu_seqlens, sa._config
    for name, mod in list(sys.modules.items()):
        if name.startswith("kernels.dsa") and hasattr(mod, "validate_cu_seqlens"):
            monkeypatch.setattr(mod, "validate_cu_seqlens",
                                lambda cu, *a: (cu is not None and calls.append(cu)) or check(cu, *a))
    monkeypatch.setattr(sa, "_config", lambda *a, **kw: seen.append(a) or config(*a, **kw))
    B, T, Hq, Hkv, D, HI, DI = 1, 47, 4, 2, 16, 2, 16
    cu = _cu(0, 9, 30, 47)
    q, k, qi, w, ki = _loss_inputs(B, T, Hq, Hkv, D, HI, DI)
    v = torch.randn_like(k)
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o, loss, idx = dsa_attention(*xs, qi.round(), w.round(), ki.round(), topk=8, cu_seqlens=cu)
    torch.autograd.grad(o.sum(), xs)
    assert len(calls) == 1, calls
    assert seen[-1][-1] == 21  # the backward's launch setting: the 21-token document
    _check_idx_valid(idx, 8, cu)
    assert check(cu, 1, T) == 21 and check(None, 1, T) == T
    with pytest.raises(ValueError, match="end at T=47"):
        dsa_attention(*xs, qi, w, ki, topk=8, cu_seqlens=_cu(0, 9, 30, 46))


def test_argument_errors():
    q, w, k = _int_indexer(1, 8, 2, 16)
    with pytest.raises(ValueError):
        dsa_topk(q, w, k, 0)
    with pytest.raises(ValueError):
        dsa_topk(q, w, k, 4, backend="cuda")
    with pytest.raises(ValueError):
        dsa_topk(q, w[:, :, :1], k, 4)
    with pytest.raises(ValueError):  # cu_seqlens must end at T
        dsa_topk(q, w, k, 4, cu_seqlens=_cu(0, 5))
    qa = torch.randn(1, 8, 6, 16, device=DEV)
    with pytest.raises(ValueError):  # Hq not a multiple of Hkv
        sparse_gqa_attention(qa, torch.randn(1, 8, 4, 16, device=DEV),
                             torch.randn(1, 8, 4, 16, device=DEV), torch.zeros(1, 8, 2, device=DEV,
                                                                                 dtype=torch.int32))
    with pytest.raises(ValueError):
        indexer_kl_loss(qa, qa, q, w, k, stage="sparse")  # sparse needs idx
    with pytest.raises(ValueError):
        indexer_kl_loss(qa, qa, q, w, k, stage="warmup")


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_inputs_that_do_not_fit_are_named(backend):
    """Inputs a caller can get wrong stop with a ValueError naming them, on both backends. Before: q and k of two
    dtypes (or q_idx and k_idx) ran into an AssertionError inside a Triton kernel; an idx or lse of the wrong shape
    gave indexer_kl_loss a silent number on the Triton backend (read out of place) and on the reference a
    broadcast (lse) or a size mismatch naming no input (idx)."""
    B, T, Hq, Hkv, D, HI, DI = 1, 16, 4, 2, 16, 2, 8
    q, k, qi, w, ki = _loss_inputs(B, T, Hq, Hkv, D, HI, DI)
    v = torch.randn_like(k)
    idx = naive.topk_indices(qi, w, ki, 4)
    f64 = torch.float64
    with pytest.raises(ValueError, match="q, k, v must have one dtype"):
        sparse_gqa_attention(q, k.to(f64), v, idx, backend=backend)
    with pytest.raises(ValueError, match="q_idx and k_idx must have one dtype"):
        dsa_topk(qi, w, ki.to(f64), 4, backend=backend)
    with pytest.raises(ValueError, match="q_idx must be a floating-point tensor"):
        dsa_topk(qi.long(), w, ki.long(), 4, backend=backend)
    with pytest.raises(ValueError, match="q, k must have one dtype"):
        indexer_kl_loss(q, k.to(f64), qi, w, ki, stage="dense", backend=backend)
    with pytest.raises(ValueError, match=r"idx \(1, 8, 4\) must be \[B=1, T=16, topk\]"):
        indexer_kl_loss(q, k, qi, w, ki, stage="sparse", idx=idx[:, :8], backend=backend)
    with pytest.raises(ValueError, match=r"lse \(1, 16, 1\) must be \[B=1, T=16, Hq=4\]"):
        indexer_kl_loss(q, k, qi, w, ki, stage="sparse", idx=idx, lse=torch.zeros(B, T, 1, device=DEV),
                        backend=backend)
    # inputs that fit still give the reference's numbers (fp32 against float64: TOL_OUT's reason)
    assert_close("kl", naive.indexer_kl_loss(q, k, qi, w, ki, "sparse", idx_BTK=idx),
                 indexer_kl_loss(q, k, qi, w, ki, stage="sparse", idx=idx, backend=backend), TOL_OUT)


def test_triton_backend_on_cpu_tensors_without_the_interpreter_is_named():
    """backend='triton' (a model's model.lm.dsa.backend=triton on a CPU machine) with kernels compiled for a GPU:
    each public function, and the context-parallel one, says what to use instead. Before, the first kernel launch
    stopped with Triton's 'RuntimeError: 0 active drivers ([]). There should only be one.' Run in a fresh process:
    whether the kernels are interpreted is fixed when they are imported."""
    import subprocess
    import sys
    from pathlib import Path
    code = """
import torch
from kernels.dsa import dsa_attention, dsa_topk, indexer_kl_loss, sparse_gqa_attention
from parallel.context.dsa import cp_topk_indices
q, k, qi, w, ki = torch.randn(1, 8, 2, 8), torch.randn(1, 8, 1, 8), torch.randn(1, 8, 2, 4), torch.randn(1, 8, 2), \
    torch.randn(1, 8, 4)
idx = dsa_topk(qi, w, ki, 4, backend="naive")
calls = [lambda: dsa_topk(qi, w, ki, 4), lambda: sparse_gqa_attention(q, k, k, idx),
         lambda: indexer_kl_loss(q, k, qi, w, ki, stage="dense"), lambda: dsa_attention(q, k, k, qi, w, ki, topk=4),
         lambda: cp_topk_indices(qi, w, ki, topk=4, cp_group=None, backend="triton")]
for call in calls:
    try:
        call()
        print("no error")
    except ValueError as e:
        print("ValueError", e)
"""
    env = {**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    lines = out.stdout.splitlines()
    assert len(lines) == 5, out.stdout + out.stderr
    assert all(line.startswith("ValueError backend='triton' needs CUDA tensors, got cpu") and "backend='naive'" in line
               for line in lines), out.stdout


# ----------------------------------------------------------------------------- GPU, bf16

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 kernels are checked on a CUDA GPU only "
                           "(the interpreter's bf16 arithmetic is wrong)")
def test_gpu_bf16():
    B, T, Hq, Hkv, D, HI, DI, topk = 1, 1500, 32, 4, 128, 16, 64, 256
    bf = torch.bfloat16
    q = torch.randn(B, T, Hq, D, device=DEV, dtype=bf)
    k = torch.randn(B, T, Hkv, D, device=DEV, dtype=bf)
    v = torch.randn(B, T, Hkv, D, device=DEV, dtype=bf)
    qi = torch.randn(B, T, HI, DI, device=DEV, dtype=bf)
    w = (torch.randn(B, T, HI, device=DEV) * (HI * DI) ** -0.5).to(bf)
    ki = torch.randn(B, T, DI, device=DEV, dtype=bf)
    idx = dsa_topk(qi, w, ki, topk)
    _check_idx_valid(idx, topk)
    s = naive.index_scores(qi, w, ki)
    sel = naive.selection_mask(idx, T)
    elig = naive.eligible_mask(B, T, None, DEV)
    worst_sel = torch.where(sel, s, torch.full_like(s, float("inf"))).amin(-1)
    best_out = torch.where(elig & ~sel, s, torch.full_like(s, float("-inf"))).amax(-1)
    assert (worst_sel >= best_out - 1e-4 * s.abs().amax()).all()  # fp32 scores of bf16 inputs
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o, lse = sparse_gqa_attention(qr, kr, vr, idx, return_lse=True)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, (qr, kr, vr), do)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o_ref, lse_ref = naive.sparse_gqa_attention(q64, k64, v64, idx)
    g_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.double())
    assert_close("o bf16", o_ref, o, 1e-2)       # bf16 output and bf16 P in the PV product
    assert_close("lse bf16", lse_ref, lse, 1e-3)  # fp32 accumulation of bf16 logits
    for name, a, b in zip(("dq", "dk", "dv"), g_ref, g):
        assert_close(f"{name} bf16", a, b, 2e-2)   # bf16 dS / P operands, fp32 accumulation
    qi_r = qi.detach().clone().requires_grad_()
    for stage in ("sparse", "dense"):
        loss = indexer_kl_loss(q, k, qi_r, w, ki, stage=stage, idx=idx,
                               lse=lse if stage == "sparse" else None)
        ref = naive.indexer_kl_loss(q, k, qi_r, w, ki, stage, idx_BTK=idx,
                                    lse_BTH=lse if stage == "sparse" else None)
        assert_close(f"{stage} loss bf16", ref.detach().reshape(1), loss.detach().reshape(1), 1e-2)
        assert_close(f"{stage} dq_idx bf16", torch.autograd.grad(ref, qi_r)[0],
                     torch.autograd.grad(loss, qi_r)[0], 3e-2)  # bf16 dI operands


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 kernels are checked on a CUDA GPU only "
                           "(the interpreter's bf16 arithmetic is wrong)")
def test_gpu_bf16_kl_in_backward():
    """The fused backward (kernels/dsa/fused.py) at Keye's head shapes in bf16, against the float64 reference
    and against the split path (a loss forward of its own), two chunks of fp32 P."""
    from kernels.dsa import indexer_loss
    B, T, Hq, Hkv, D, HI, DI, topk = 1, 1500, 32, 4, 128, 16, 64, 256
    bf = torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(0)
    xs = [torch.randn(*s, device=DEV, generator=g).to(bf) for s in
          ((B, T, Hq, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, HI, DI))]
    xs.insert(4, (torch.randn(B, T, HI, device=DEV, generator=g) * (HI * DI) ** -0.5).to(bf))
    xs.append(torch.randn(B, T, DI, device=DEV, generator=g).to(bf))
    do = torch.randn(B, T, Hq, D, device=DEV, generator=g).to(bf)
    names = ("dq", "dk", "dv", "dq_idx", "dw", "dk_idx")
    old = indexer_loss.LOSS_CHUNK_BYTES
    indexer_loss.LOSS_CHUNK_BYTES = 1 << 20  # ~1.6 MB of fp32 P at this size: two chunks
    try:
        a = [x.clone().requires_grad_() for x in xs]
        o, kl, idx = dsa_attention(*a, topk=topk, kl_in_backward=0.5)
        ga = torch.autograd.grad(o, a, do)
    finally:
        indexer_loss.LOSS_CHUNK_BYTES = old
    b = [x.clone().requires_grad_() for x in xs]
    o2, kl2, idx2 = dsa_attention(*b, topk=topk)
    gb = torch.autograd.grad((o2 * do).sum() + 0.5 * kl2, b)
    assert torch.equal(idx, idx2) and torch.equal(o, o2)
    # the split path caches P in bf16 (8 bits), the fused one sums it in fp32: the KL and the indexer's gradients
    # differ by that rounding; dq is computed identically, dk / dv by fp32 atomics in another order
    assert abs(float(kl) - float(kl2)) <= 1e-2 * abs(float(kl2)), (float(kl), float(kl2))
    for name, x, y in zip(names, gb, ga):
        # dk / dv: bf16 roundings of fp32 sums that differ in their last bits (a few elements one bf16 ulp apart)
        tol = 2e-3 if name in ("dq", "dk", "dv") else 1e-2
        assert_close(f"fused vs split {name}", x.float(), y.float(), tol)
    r = [x.detach().double().requires_grad_() for x in xs]
    o_r, lse_r = naive.sparse_gqa_attention(r[0], r[1], r[2], idx)
    kl_r = naive.indexer_kl_loss(r[0].detach(), r[1].detach(), r[3], r[4], r[5], "sparse", idx_BTK=idx,
                                 lse_BTH=lse_r.detach())
    gr = torch.autograd.grad((o_r * do.double()).sum() + 0.5 * kl_r, r)
    assert abs(float(kl) - float(kl_r)) <= 1e-2 * abs(float(kl_r))
    for name, x, y in zip(names, gr, ga):
        assert_close(f"fused vs float64 {name}", x, y, 2e-2 if name in ("dq", "dk", "dv") else 3e-2)  # test_gpu_bf16's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 kernels are checked on a CUDA GPU only "
                           "(the interpreter's bf16 arithmetic is wrong)")
def test_gpu_bf16_dense_kl_autograd_scales_in_fp32():
    """The dense-stage loss through autograd, scaled by 1.5 (a context-parallel rank's rows-to-mean factor),
    gives the gradients of the loss back-propagated at once with grad 1.5, to the bf16 rounding of one result:
    the autograd path keeps its gradients in fp32 until the scale (in bf16 they would round twice: 2.9e-3
    apart on an H200)."""
    from kernels.dsa import indexer_kl_loss_backward_now
    B, T, Hq, Hkv, D, HI, DI = 1, 1500, 32, 4, 128, 16, 64
    bf = torch.bfloat16
    q, k = (torch.randn(B, T, h, D, device=DEV, dtype=bf) for h in (Hq, Hkv))
    qi = torch.randn(B, T, HI, DI, device=DEV, dtype=bf)
    w = (torch.randn(B, T, HI, device=DEV) * (HI * DI) ** -0.5).to(bf)
    ki = torch.randn(B, T, DI, device=DEV, dtype=bf)
    a = [x.clone().requires_grad_() for x in (qi, w, ki)]
    (indexer_kl_loss(q, k, *a, stage="dense") * 1.5).backward()
    b = [x.clone().requires_grad_() for x in (qi, w, ki)]
    indexer_kl_loss_backward_now(q, k, *b, grad=1.5)
    for name, x, y in zip(("dq_idx", "dw", "dk_idx"), a, b):
        # both scale the same fp32 sums (in another order) and round once to bf16: only elements whose two
        # fp32 values straddle a bf16 rounding boundary differ, by one ulp (2^-8 relative)
        assert_close(f"autograd vs at once {name}", y.grad.float(), x.grad.float(), 5e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the bf16 score path (paired inline-asm stores) compiles for a CUDA GPU only")
@pytest.mark.parametrize("B,T,cu", [(2, 1001, None), (1, 4097, (0, 1500, 1501, 4097)), (3, 130, None)])
def test_gpu_topk_bf16_exact(B, T, cu, topk_mode):
    """bf16 inputs take the stored path's hoisted, paired-store score kernel (fp32 inputs do not):
    integer-valued bf16 inputs give exact fp32 scores, so both paths equal the reference exactly,
    at odd T (the odd row length pads the slab) and across batch rows and documents."""
    cu = None if cu is None else _cu(*cu)
    q, w, k = (x.to(torch.bfloat16) for x in _int_indexer(B, T, 16, 64, -4, 5, w_lo=-1))
    ref = naive.topk_indices(q.double(), w.double(), k.double(), 64, cu)
    out = dsa_topk(q, w, k, 64, cu_seqlens=cu, cap=256, num_samples=128)
    _check_idx_valid(out, 64, cu)
    assert torch.equal(out, ref)
