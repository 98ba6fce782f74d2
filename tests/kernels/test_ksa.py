"""KSA: the mask against a transcription of the rule, the Triton kernels (forward and backward)
and the FlexAttention path against the mask reference (kernels/ksa/naive.py).

On CPU the Triton kernels run under TRITON_INTERPRET=1 in fp32 (bf16 is wrong in the interpreter);
the bf16 check runs on a GPU only. Shapes are small and odd: the interpreter's cost grows with the
number of programs and tiles.
"""
import pytest
import torch

from kernels.ksa import default_config, ksa_attention, ksa_attention_flex, ksa_mask, ksa_token_info
from kernels.ksa.attention import ksa_bwd, ksa_fwd
from tests.kernels.helpers import assert_close, poison_

SEED = 42
# Interpreter on CPU; the compiled kernels when a GPU is present (conftest sets TRITON_INTERPRET only without one)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: only the summation order differs from the reference (interpreter); on a GPU the dots run as
# three tf32 passes ("tf32x3"), a little less exact
TOL_FP32 = 1e-5 if DEVICE == "cpu" else 5e-5


def _rule_by_pairs(T: int, chunk: int, num_summary: int, window: int, cu: list[int] | None) -> torch.Tensor:
    """The KSA rule written out pair by pair, in the words of the design (no vectorised shortcuts)."""
    period = chunk + num_summary
    bounds = [0, T] if cu is None else cu
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for start, end in zip(bounds[:-1], bounds[1:]):  # documents never see each other
        for i in range(end - start):
            q_chunk, q_is_summary = i // period, i % period >= chunk
            for j in range(end - start):
                k_chunk, k_is_summary = j // period, j % period >= chunk
                if q_is_summary:  # own chunk, text and summaries, causally
                    ok = k_chunk == q_chunk and j <= i
                elif not k_is_summary:  # own chunk's text causally + all text of the previous W chunks
                    ok = (k_chunk == q_chunk and j <= i) or (q_chunk - window <= k_chunk < q_chunk)
                else:  # summaries of every chunk older than the window
                    ok = k_chunk < q_chunk - window
                allowed[start + i, start + j] = ok
    return allowed


@pytest.mark.parametrize(
    "T,chunk,num_summary,window,cu",
    [
        (47, 4, 1, 2, None),
        (47, 3, 2, 0, None),
        (40, 8, 1, 1, None),
        (30, 4, 1, 100, None),
        (53, 4, 1, 1, [0, 3, 3, 13, 40, 53]),
    ],
)
def test_mask_matches_rule(T, chunk, num_summary, window, cu):
    cu_t = None if cu is None else torch.tensor(cu)
    mask = ksa_mask(T, chunk=chunk, window=window, num_summary=num_summary, cu_seqlens=cu_t)
    assert torch.equal(mask, _rule_by_pairs(T, chunk, num_summary, window, cu))
    # a text query never sees both the raw text and the summary of one chunk
    doc, local = ksa_token_info(T, cu_seqlens=cu_t)
    period = chunk + num_summary
    is_sum = local % period >= chunk
    chunk_id = doc * T + local // period
    for i in torch.nonzero(~is_sum).flatten().tolist():
        seen_text = set(chunk_id[mask[i] & ~is_sum].tolist())
        seen_sum = set(chunk_id[mask[i] & is_sum].tolist())
        assert not seen_text & seen_sum, f"query {i} sees text and summary of chunks {seen_text & seen_sum}"


def _inputs(B, T, Hq, Hkv, D, dtype=torch.float32, device="cpu"):
    torch.manual_seed(SEED)
    q = torch.randn(B, T, Hq, D, dtype=dtype, device=device)
    k = torch.randn(B, T, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(B, T, Hkv, D, dtype=dtype, device=device)
    do = torch.randn(B, T, Hq, D, dtype=dtype, device=device)
    return q, k, v, do


def _reference(q, k, v, do, **kw):
    q, k, v = (x.detach().float().requires_grad_() for x in (q, k, v))
    o = ksa_attention(q, k, v, backend="naive", **kw)
    o.backward(do.float())
    return o.detach(), q.grad, k.grad, v.grad


def _summary_rows(B, T, chunk, num_summary, cu):
    _, local = ksa_token_info(T, cu_seqlens=cu)
    return (local % (chunk + num_summary) >= chunk).repeat(B)


def _check_kernels(B, T, Hq, Hkv, D, chunk, num_summary, window, cu=None, config=None, dtype=torch.float32,
                   device="cpu", tol=None):
    """Low-level forward + backward on NaN-poisoned buffers, compared on text and summary rows."""
    tol = tol or {"o": TOL_FP32, "dq": TOL_FP32, "dk": TOL_FP32, "dv": TOL_FP32}
    q, k, v, do = _inputs(B, T, Hq, Hkv, D, dtype, device)
    cu_t = None if cu is None else torch.tensor(cu, device=device)
    ref = _reference(q, k, v, do, chunk=chunk, window=window, num_summary=num_summary, cu_seqlens=cu_t)
    cu_k = (torch.arange(B + 1, device=device) * T if cu_t is None else cu_t).to(torch.int32)
    config = config or default_config(head_dim=D, group=Hq // Hkv, dtype=dtype, on_gpu=q.is_cuda)
    flat = [x.reshape(B * T, x.shape[2], D) for x in (q, k, v, do)]
    qf, kf, vf, dof = flat
    o = poison_(torch.empty_like(qf))
    lse = poison_(torch.empty(B * T, Hq, device=device))
    kw = dict(chunk=chunk, num_summary=num_summary, window=window, scale=D ** -0.5, config=config)
    ksa_fwd(qf, kf, vf, cu_k, o=o, lse=lse, **kw)
    assert torch.isfinite(lse).all(), "lse: unwritten rows"
    grads = [poison_(torch.empty_like(x)) for x in (qf, kf, vf)]
    ksa_bwd(dof, qf, kf, vf, o, lse, cu_k, dq=grads[0], dk=grads[1], dv=grads[2], **kw)
    is_sum = _summary_rows(B, T, chunk, num_summary, cu_t).to(device)
    assert is_sum.any() and (~is_sum).any()
    for name, r, t in zip(("o", "dq", "dk", "dv"), ref, (o, *grads)):
        r = r.reshape(B * T, -1, D)
        assert_close(f"{name}[text]", r[~is_sum], t[~is_sum].float(), tol[name])
        assert_close(f"{name}[summary]", r[is_sum], t[is_sum].float(), tol[name])


def _tiny_tiles(group: int):
    """Tiles of 2 tokens x 4 keys: every tile loop (masked edges, unmasked middle) runs at small T."""
    base = default_config(head_dim=16, group=group, dtype=torch.float32, on_gpu=False)
    return base.with_(fwd_block_t=2, fwd_block_n=4, dq_block_t=2, dq_block_n=4, dkdv_block_n=4, dkdv_block_t=2)


@pytest.mark.parametrize(
    "B,T,Hq,Hkv,D,chunk,num_summary,window,cu,tiles",
    [
        pytest.param(1, 61, 4, 2, 16, 4, 1, 2, None, None, id="odd-T61-gqa2-W2"),
        pytest.param(1, 95, 8, 1, 16, 8, 1, 1, None, None, id="model-C8-gqa8-W1"),
        pytest.param(1, 50, 4, 2, 16, 4, 1, 1000, None, None, id="window-beyond-sequence"),
        pytest.param(2, 37, 4, 2, 16, 3, 2, 0, None, None, id="batch2-S2-W0"),
        pytest.param(1, 73, 4, 2, 16, 4, 1, 2, [0, 3, 3, 13, 40, 50, 73], None, id="packed-docs"),
        pytest.param(1, 61, 3, 1, 24, 4, 1, 1, None, None, id="group3-dim24-padded"),
        pytest.param(1, 71, 4, 2, 16, 4, 1, 3, None, "tiny", id="tiny-tiles-all-loops"),
    ],
)
def test_triton_matches_naive(B, T, Hq, Hkv, D, chunk, num_summary, window, cu, tiles):
    if tiles == "tiny" and DEVICE == "cuda":
        pytest.skip("tiles below tl.dot's 16-row minimum run only in the interpreter")
    config = _tiny_tiles(Hq // Hkv) if tiles == "tiny" else None
    _check_kernels(B, T, Hq, Hkv, D, chunk, num_summary, window, cu=cu, config=config, device=DEVICE)


def test_triton_gpu_tile_sizes_under_interpreter():
    """The GPU's tile sizes (128-row query tiles of 16 tokens x 8 heads, 64/128-key tiles) on CPU."""
    config = default_config(head_dim=128, group=8, dtype=torch.bfloat16, on_gpu=True)
    _check_kernels(1, 701, 8, 1, 16, 8, 1, 4, cu=[0, 150, 701], config=config, device=DEVICE)


def test_gpu_code_path_under_interpreter(monkeypatch):
    """The kernels' GPU branch (for loops with tensor bounds, volatile reloads of the schedule), run by
    the interpreter. Its tensor.__index__ calls int() on a 1-element array, which numpy 2.4 rejects
    (why the kernels use while loops there); patched for this test only."""
    import numpy as np
    import triton.runtime.interpreter as interp

    import kernels.ksa.attention as ksa_kernels

    if torch.cuda.is_available() or not ksa_kernels._INTERPRET:
        pytest.skip("compiled kernels: test_triton_bf16_gpu covers the GPU branch")
    if not hasattr(interp, "_patch_lang_tensor"):
        pytest.skip("this Triton's interpreter has no _patch_lang_tensor to patch")
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patched)
    monkeypatch.setattr(ksa_kernels, "_INTERPRET", False)
    _check_kernels(1, 61, 4, 2, 16, 4, 1, 1, cu=[0, 18, 61], config=_tiny_tiles(2))


def test_autograd_api_matches_naive():
    B, T, Hq, Hkv, D, kw = 2, 41, 4, 2, 16, dict(chunk=4, window=2, num_summary=1)
    q, k, v, do = _inputs(B, T, Hq, Hkv, D, device=DEVICE)
    ref = _reference(q, k, v, do, **kw)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    o = ksa_attention(q, k, v, backend="triton", **kw)
    o.backward(do)
    for name, r, t in zip(("o", "dq", "dk", "dv"), ref, (o, q.grad, k.grad, v.grad)):
        assert_close(name, r, t, TOL_FP32)  # fp32: summation order only (tf32x3 dots on a GPU)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_matches_naive():
    T, kw = 73, dict(chunk=4, window=2, num_summary=1, cu_seqlens=torch.tensor([0, 13, 40, 73]))
    q, k, v, _ = _inputs(1, T, 4, 2, 16)
    ref = ksa_attention(q, k, v, backend="naive", **kw)
    out = ksa_attention_flex(q, k, v, **kw)
    assert_close("o", ref, out, TOL_FP32)  # fp32 on both sides (FlexAttention has no CPU backward)


def test_argument_errors():
    q, k, v, _ = _inputs(2, 10, 4, 2, 16)
    with pytest.raises(ValueError, match="chunk"):
        ksa_attention(q, k, v, chunk=0, window=1)
    with pytest.raises(ValueError, match="window"):
        ksa_attention(q, k, v, chunk=4, window=-1)
    with pytest.raises(ValueError, match="batch 1"):
        ksa_attention(q, k, v, chunk=4, window=1, cu_seqlens=torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="multiple"):
        ksa_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1), chunk=4, window=1)
    with pytest.raises(ValueError, match="backend"):
        ksa_attention(q, k, v, chunk=4, window=1, backend="dense")
    with pytest.raises(ValueError, match="cu_seqlens"):
        ksa_attention(q[:1], k[:1], v[:1], chunk=4, window=1, cu_seqlens=torch.tensor([0, 4, 9]))


@pytest.mark.parametrize("backend", ["naive", "triton"])
def test_inputs_that_do_not_fit_are_named(backend):
    """Inputs a caller can get wrong stop with a ValueError naming them, on ksa_attention's backends and on
    ksa_attention_triton itself. Before: integer q, k, v ran into an InterpreterError inside a Triton kernel
    ('Unsupported lhs dtype int64'; a compile error on a GPU) and the reference returned integers; ksa_attention_triton
    took q and k of two dtypes into the kernel ('Both operands must be same dtype') and a float cu_seqlens was cut
    to integers without a word."""
    from kernels.ksa import ksa_attention_triton

    T, kw = 23, dict(chunk=4, window=1)
    q, k, v, _ = _inputs(1, T, 4, 2, 16, device=DEVICE)
    calls = {"ksa_attention": lambda *a, **x: ksa_attention(*a, backend=backend, **x)}
    if backend == "triton":
        calls["ksa_attention_triton"] = ksa_attention_triton
    for name, f in calls.items():
        with pytest.raises(ValueError, match="q must be a floating-point tensor, got torch.int64"):
            f(q.long(), k.long(), v.long(), **kw)
        with pytest.raises(ValueError, match="v must be a floating-point tensor, got torch.int32"):
            f(q, k, v.int(), **kw)
        with pytest.raises(ValueError, match="q, k, v must have one dtype, got torch.float32, torch.float64"):
            f(q, k.double(), v, **kw)
        with pytest.raises(ValueError, match="cu_seqlens must be an integer tensor, got torch.float32"):
            f(q, k, v, cu_seqlens=torch.tensor([0.0, 9.5, T]), **kw)
        with pytest.raises(ValueError, match=r"expected q \[B,T,Hq,D\]"):
            f(q[0], k[0], v[0], **kw)
    # inputs that fit still give the reference's numbers (fp32 on both sides: TOL_FP32's reason)
    assert_close("o", ksa_attention(q, k, v, backend="naive", **kw), ksa_attention(q, k, v, backend=backend, **kw),
                 TOL_FP32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton numerics need a CUDA GPU (interpreter bf16 is wrong)")
def test_triton_bf16_gpu():
    # bf16 inputs, bf16 P and dS in the tile matmuls, fp32 accumulation; reference in fp32 from the same inputs
    tol = {"o": 1e-2, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2}
    _check_kernels(1, 4133, 32, 4, 128, 8, 1, 16, cu=[0, 1500, 4133], dtype=torch.bfloat16, device="cuda", tol=tol)
    # fp32 at the real model's shape, structural check with GPU tiles; dots run as 3 tf32 passes ("tf32x3")
    tol32 = {name: 5e-5 for name in ("o", "dq", "dk", "dv")}
    _check_kernels(1, 2311, 32, 4, 128, 8, 1, 8, cu=[0, 811, 2311], dtype=torch.float32, device="cuda", tol=tol32)
