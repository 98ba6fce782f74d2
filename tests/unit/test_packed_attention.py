"""Dense causal GQA attention over packed documents (models/attention/dense.py) against a masked float64
reference: every path (one SDPA call per document; on a GPU also one varlen call) gives the reference's
output and gradients, including an empty document and a single document."""
from __future__ import annotations

import pytest
import torch

from models.attention import dense
from models.sdpa import sdpa
from tests.kernels.helpers import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HKV, S, D = 4, 2, 40, 16
SCALE = 0.3


def _reference(q, k, v, bounds):
    """float64 attention with an explicit [S, S] mask: same document and not in the future."""
    q, k, v = (t.double() for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    n = q.shape[2]
    doc = torch.bucketize(torch.arange(n), torch.tensor(bounds[1:]), right=True)
    pos = torch.arange(n)
    mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    s = (q @ k.transpose(-1, -2) * SCALE).masked_fill(~mask.to(q.device), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _grads(fn, x, dout):
    t = [a.clone().requires_grad_(True) for a in x]
    out = fn(*t)
    out.backward(dout.to(out.dtype))
    return [out.detach().double()] + [a.grad.double() for a in t]


@pytest.mark.parametrize("bounds", [(0, 5, 5, 17, 40), (0, 40), (0, 1, 2, 40)])
@pytest.mark.parametrize("path,dtype", [("per_document", torch.float32), ("causal_attention", torch.float32),
                                        ("varlen", torch.bfloat16), ("per_document", torch.bfloat16)])
def test_packed_attention_matches_masked_reference(bounds, path, dtype, monkeypatch):
    if path == "varlen" and (DEV != "cuda" or dense._varlen() is None):
        pytest.skip("torch's varlen attention needs a CUDA GPU")
    g = torch.Generator().manual_seed(len(bounds))
    x = [torch.randn(1, h, S, D, generator=g).to(DEV, dtype) for h in (HQ, HKV, HKV)]
    dout = torch.randn(1, HQ, S, D, generator=g).to(DEV)
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)
    if path == "per_document":
        fn = lambda q, k, v: dense.per_document_attention(q, k, v, cu, SCALE)  # noqa: E731
    else:
        if path == "varlen":  # whatever the documents' mean length
            monkeypatch.setattr(dense, "VARLEN_BELOW_MEAN_DOC", S + 1)
        fn = lambda q, k, v: dense.causal_attention(q, k, v, cu, SCALE, max_seqlen=max(  # noqa: E731
            b - a for a, b in zip(bounds[:-1], bounds[1:])))
    got = _grads(fn, x, dout)
    ref = _grads(lambda q, k, v: _reference(q, k, v, bounds), [a.double() for a in x], dout.double())
    # fp32: SDPA's fp32 kernels against float64, sums over <= 40 keys (~1e-6); bf16: bf16 inputs are the
    # same for both, so only the kernels' bf16 P / dS operands and bf16 outputs differ (~4e-3 measured on
    # the H200 against the per-document loop at 32 heads)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for name, r, a in zip(("out", "dq", "dk", "dv"), ref, got):
        assert_close(name, r, a, tol)


@pytest.mark.skipif(DEV != "cuda", reason="SDPA's GPU kernels")
def test_per_document_gradients_at_model_head_dim():
    """At head dim 128 in bf16 SDPA's GPU backward gave wrong dq / dk / dv for a document whose output
    gradient was a slice of the row's (torch 2.11, H200); per_document_attention hands on a contiguous one."""
    n, bounds = 512, tuple(range(0, 513, 128))
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(1, h, n, 128, generator=g).to(DEV, torch.bfloat16) for h in (8, 2, 2)]
    dout = torch.randn(1, 8, n, 128, generator=g).to(DEV)
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)
    got = _grads(lambda q, k, v: dense.per_document_attention(q, k, v, cu, SCALE), x, dout)
    ref = _grads(lambda q, k, v: _reference(q, k, v, bounds), [a.double() for a in x], dout.double())
    for name, r, a in zip(("out", "dq", "dk", "dv"), ref, got):
        assert_close(name, r, a, 2e-2)  # bf16 operands, as in the test above


@pytest.mark.parametrize("first,second,n", [("strided", "contiguous", 1096), ("contiguous", "strided", 1104)])
def test_sdpa_gradient_does_not_depend_on_an_earlier_gradient_layout(first, second, n):
    """models.sdpa: two backwards of one shape, the output gradient first laid out one way (a slice of a
    longer row, or contiguous) and then the other, both against float64. Plain SDPA got the second one
    wrong on the H200 (torch 2.11's cuDNN backend reuses the first backward's layout for the shape;
    bench/probe_sdpa_grad_layout.py). Each case has a shape of its own, since the reuse is per shape. On
    CPU (8 heads there, to stay fast) both layouts are right either way."""
    hq = 32 if DEV == "cuda" else 8
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, h, n, 128, generator=g).to(DEV, torch.bfloat16) for h in (hq, 4, 4))
    row = torch.randn(1, hq, 2 * n, 128, generator=g).to(DEV, torch.bfloat16)
    layouts = {"strided": row[:, :, :n], "contiguous": row[:, :, :n].contiguous()}
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True).backward(
        row[:, :, :n].double())
    for layout in (first, second):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        sdpa(qq, kk, vv, is_causal=True, enable_gqa=True).backward(layouts[layout])
        for name, ref, got in (("dq", qr, qq), ("dk", kr, kk), ("dv", vr, vv)):
            assert_close(f"{name} ({layout} after {first})", ref.grad, got.grad.double(), 2e-2)  # bf16 operands


def test_packed_attention_rejects_bounds_that_do_not_cover_the_row():
    x = [torch.randn(1, h, S, D) for h in (HQ, HKV, HKV)]
    with pytest.raises(ValueError, match="from 0 to the row's 40 tokens, got 0 .. 30"):
        dense.per_document_attention(*x, torch.tensor([0, 10, 30]), SCALE)


def _cores():
    """The dense and the KSA core attention of one small layer (KSA: chunk 4, one summary, window 8, its naive
    backend)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from models.attention.ksa import KSACoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV,
                            kv_channels=D, use_cpu_initialization=True, params_dtype=torch.float32,
                            attention_dropout=0.0)
    common = dict(layer_number=1, attn_mask_type=None, attention_type="self", softmax_scale=SCALE)
    return {"dense": dense.SDPACoreAttention(cfg, **common),
            "ksa": KSACoreAttention(cfg, **common, chunk=4, num_summary=1, window=8, backend="naive")}


def _core_run(core, x, dout, bounds, **tail):
    """The core attention's output [1, h, s, d] on a packed row ([1, h, s, d] inputs) and its input gradients."""
    from models.moe.router import PackedSeqDocuments

    cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    packed = PackedSeqDocuments(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                max_seqlen_kv=longest, **tail)
    t = [a.clone().requires_grad_(True) for a in x]
    out = core(*(a.permute(2, 0, 1, 3) for a in t), None, packed_seq_params=packed)  # megatron's [s, b, h, d]
    out = out.view(out.shape[0], 1, HQ, D).permute(1, 2, 0, 3)
    out.backward(dout)
    return [out.detach()] + [a.grad for a in t]


@pytest.mark.parametrize("kind", ["dense", "ksa"])
def test_the_padding_at_a_rows_end_is_not_attended(kind):
    """The padding the trainer names at a row's end (PackedSeqDocuments.pad_tail: 12 tokens in 2 segments here, as
    a KSA row of a video pack ends) is cut off before the core attention: the documents' tokens get the output and
    gradients of the same layer on the row without it (the dense one also against the masked float64 reference),
    the padding a zero output and no gradient (computed, it has a nonzero output: checked)."""
    core = _cores()[kind]
    g = torch.Generator().manual_seed(7)
    x = [torch.randn(1, h, S, D, generator=g).to(DEV) for h in (HQ, HKV, HKV)]
    dout = torch.randn(1, HQ, S, D, generator=g).to(DEV)
    dout[:, :, 28:] = 0.0                       # the padding carries no loss
    bounds, real = (0, 11, 28, 33, 40), 28      # documents of 11 and 17 tokens, then padding of 5 and 7
    got = _core_run(core, x, dout, bounds, pad_tail=S - real, pad_tail_segments=2)
    ref = _core_run(core, [a[:, :, :real] for a in x], dout[:, :, :real], bounds[:3])
    for name, r, a in zip(("out", "dq", "dk", "dv"), ref, got):
        # the same kernels on the same documents: fp32 sums over <= 17 keys in another call order (~1e-7)
        assert_close(name, r, a[:, :, :real], 2e-5)
        assert torch.equal(a[:, :, real:], torch.zeros_like(a[:, :, real:])), name
    if kind == "dense":
        masked = _grads(lambda q, k, v: _reference(q, k, v, bounds[:3]), [a[:, :, :real].double() for a in x],
                        dout[:, :, :real].double())
        for name, r, a in zip(("out", "dq", "dk", "dv"), masked, got):
            assert_close(name, r, a[:, :, :real].double(), 2e-5)  # fp32 SDPA against float64 (as above)
    computed = _core_run(core, x, dout, bounds)[0]
    assert computed[:, :, real:].abs().amax() > 0.1


def test_a_row_of_padding_alone_is_attended_and_a_tail_must_leave_a_segment():
    """A row the trainer names all padding (pad_tail = s) is attended as before (so its projections still get a
    gradient); a tail that names every segment, or none, is refused."""
    core = _cores()["dense"]
    g = torch.Generator().manual_seed(8)
    x = [torch.randn(1, h, S, D, generator=g).to(DEV) for h in (HQ, HKV, HKV)]
    dout = torch.randn(1, HQ, S, D, generator=g).to(DEV)
    whole = _core_run(core, x, dout, (0, 40), pad_tail=S, pad_tail_segments=1)
    plain = _core_run(core, x, dout, (0, 40))
    for name, r, a in zip(("out", "dq", "dk", "dv"), plain, whole):
        assert torch.equal(r, a), name
    for segments in (0, 2):
        with pytest.raises(ValueError, match=f"padding takes {segments} of its 2 segments"):
            _core_run(core, x, dout, (0, 30, 40), pad_tail=10, pad_tail_segments=segments)
