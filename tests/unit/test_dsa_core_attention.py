"""DSACoreAttention (models/attention/dsa.py), sparse stage: when no document of the micro-batch is longer
than top-k, every token selects its whole causal prefix, and the layer runs the dense kernels instead of
selection + union plan + sparse attention. Its output, KL and gradients must equal the sparse path's
(kernels/dsa.dsa_attention, the float64 reference backend), and the sparse path must still run as soon as
one document is longer than top-k. kl_backward="local" (the warm-up's indexer-only step) gives the indexer
the gradients that the attached KL gives, in the forward, and leaves a frozen model nothing to back-propagate."""
from __future__ import annotations

import types

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig

import models.attention.dsa as mdsa
from kernels.dsa import dsa_attention
from tests.kernels.helpers import assert_close
from tests.kernels.test_dsa import _interpreter_fixes  # noqa: F401  (triton 3.6's interpreter with numpy 2)

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU, the interpreter on CPU
S, HQ, HKV, D, HI, DI = 40, 4, 2, 16, 4, 8
SCALE = D ** -0.5
# fp32 SDPA / fp32 Triton kernels (interpreter) against the float64 reference, sums over <= 40 keys:
# rounding ~1e-7; the same bounds as tests/kernels/test_dsa.py's TOL_OUT / TOL_GRAD.
TOL_OUT, TOL_GRAD = 1e-5, 2e-5


def _core(topk: int, backend: str, stage: str = "sparse") -> mdsa.DSACoreAttention:
    cfg = TransformerConfig(num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV,
                            kv_channels=D, use_cpu_initialization=True, params_dtype=torch.float32)
    core = mdsa.DSACoreAttention(cfg, layer_number=1, attn_mask_type=None, attention_type="self", topk=topk,
                                 stage=stage, softmax_scale=SCALE, backend=backend)
    return core.train()


def _inputs():
    g = torch.Generator().manual_seed(3)
    shapes = dict(q=(1, S, HQ, D), k=(1, S, HKV, D), v=(1, S, HKV, D), q_idx=(1, S, HI, DI), w=(1, S, HI),
                  k_idx=(1, S, DI), dout=(1, S, HQ, D))
    return {n: torch.randn(*s, generator=g).to(DEV) for n, s in shapes.items()}


def _packed(bounds, max_seqlen):
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen,
                           max_seqlen_kv=max_seqlen)


def _run_core(core, x, packed):
    """The layer's output [b, s, hq, d], its KL, and the gradients of sum(out * dout) + the attached KL."""
    t = {n: x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "q_idx", "w", "k_idx")}
    core.indexer_out = (t["q_idx"], t["w"], t["k_idx"])
    q, k, v = (t[n].transpose(0, 1) for n in ("q", "k", "v"))  # megatron's [s, b, h, d]
    out = core(q, k, v, None, packed_seq_params=packed)
    out = out.view(x["q"].shape[1], 1, HQ, D).transpose(0, 1)
    (out * x["dout"]).sum().backward()  # the attached KL's gradient is b * s (loss_weight 1, tp 1)
    return out.detach(), core.last_kl, {n: p.grad for n, p in t.items()}


def _run_reference(x, topk, cu):
    t = {n: x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "q_idx", "w", "k_idx")}
    o, kl, _ = dsa_attention(t["q"], t["k"], t["v"], t["q_idx"], t["w"], t["k_idx"], topk=topk, scale=SCALE,
                             cu_seqlens=cu, backend="naive")
    ((o * x["dout"]).sum() + kl * S).backward()
    return o.detach(), kl.detach(), {n: p.grad for n, p in t.items()}


@pytest.mark.parametrize("backend", ["naive", "triton"])
@pytest.mark.parametrize("case", ["packed", "packed_tensor_max", "unpacked"])
def test_sparse_stage_with_every_key_selected_runs_dense_and_matches(case, backend, monkeypatch):
    bounds = (0, 12, 30, 40)                        # longest document: 18 tokens
    topk, cu, packed = {
        "packed": (18, torch.tensor(bounds, dtype=torch.int32, device=DEV), _packed(bounds, 18)),
        # megatron also allows tensors here: the layer then reads the bounds
        "packed_tensor_max": (18, torch.tensor(bounds, dtype=torch.int32, device=DEV), _packed(bounds, torch.tensor(18))),
        "unpacked": (S, None, None),                # one document of S = top-k tokens
    }[case]
    x = _inputs()
    ref = _run_reference(x, topk, cu)
    monkeypatch.setattr(mdsa, "dsa_attention", lambda *a, **k: pytest.fail("the sparse path ran"))
    out, kl, grads = _run_core(_core(topk, backend), x, packed)
    assert_close("out", ref[0], out, TOL_OUT)
    assert_close("kl", ref[1], kl, TOL_OUT)
    for name, g in ref[2].items():
        assert_close(name, g, grads[name], TOL_GRAD)


@pytest.mark.parametrize("backend,in_backward", [("naive", True), ("triton", True), ("triton", False)])
def test_sparse_stage_with_a_longer_document_takes_the_sparse_path(backend, in_backward, monkeypatch):
    """... and its KL reaches the indexer through the attention's backward (kl_in_attention_backward, the
    Triton backend: kernels/dsa/fused.py; the reference backend attaches it to the output), or through a
    loss forward of its own: the same output, KL and gradients as the float64 reference either way."""
    bounds = (0, 12, 30, 40)
    calls = []
    real = mdsa.dsa_attention
    monkeypatch.setattr(mdsa, "dsa_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = _inputs()
    core = _core(17, backend)
    core.kl_in_attention_backward = in_backward
    out, kl, grads = _run_core(core, x, _packed(bounds, 18))  # 18 > top-k 17
    assert [c["topk"] for c in calls] == [17]
    assert (calls[0]["kl_in_backward"] is not None) == in_backward
    ref = _run_reference(x, 17, torch.tensor(bounds, dtype=torch.int32, device=DEV))
    assert_close("out", ref[0], out, TOL_OUT)
    assert_close("kl", ref[1], kl, TOL_OUT)
    for name, g in ref[2].items():
        assert_close(name, g, grads[name], TOL_GRAD)


@pytest.mark.skipif(DEV == "cuda", reason="counts the interpreter's atomics")
@pytest.mark.parametrize("in_backward", [True, False])
def test_the_layer_takes_the_deterministic_backward_under_torchs_switch(in_backward, monkeypatch):
    """train.deterministic turns on torch's deterministic algorithms; the layer on the Triton backend then takes
    the sparse stage's backward without fp32 atomics (kernels/dsa: int64 fixed-point sums, exact in any order,
    converted by common.from_fixed_point), with no setting of its own, and still matches the float64 reference."""
    import kernels.dsa.fused as kf
    import kernels.dsa.indexer_loss as kil
    import kernels.dsa.sparse_attn as ksa
    from tests.kernels.test_dsa import _Atomics

    sums = []
    for mod in (kf, kil, ksa):
        monkeypatch.setattr(mod, "from_fixed_point", lambda *a, _real=mod.from_fixed_point: sums.append(1) or _real(*a))
    atomics = _Atomics(monkeypatch)
    bounds = (0, 12, 30, 40)
    x = _inputs()
    core = _core(17, "triton")
    core.kl_in_attention_backward = in_backward
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    atomics.on = True
    try:
        out, kl, grads = _run_core(core, x, _packed(bounds, 18))  # 18 > top-k 17: the sparse path
    finally:
        atomics.on = False
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    assert atomics.n == 0 and atomics.n_int64 and sums, (atomics.n, atomics.n_int64, len(sums))
    ref = _run_reference(x, 17, torch.tensor(bounds, dtype=torch.int32, device=DEV))
    assert_close("out", ref[0], out, TOL_OUT)
    assert_close("kl", ref[1], kl, TOL_OUT)
    for name, g in ref[2].items():
        assert_close(name, g, grads[name], TOL_GRAD)


def test_longest_document():
    assert mdsa.longest_document(40, None) == 40
    assert mdsa.longest_document(40, _packed((0, 12, 30, 40), 18)) == 18
    assert mdsa.longest_document(40, _packed((0, 12, 30, 40), torch.tensor(99))) == 18  # reads the bounds
    assert mdsa.longest_document(40, types.SimpleNamespace(max_seqlen_q=None,
                                                            cu_seqlens_q=torch.tensor([0, 7, 40]))) == 33


@pytest.mark.parametrize("stage,topk,backend", [("dense_warmup", 8, "naive"), ("dense_warmup", 8, "triton"),
                                                 ("sparse", 8, "naive"), ("sparse", S, "naive")])
def test_local_kl_backward_gives_the_attached_gradients_in_the_forward(stage, topk, backend):
    """kl_backward="local": the indexer's gradients exist when the forward returns and equal those of the
    default attach path after its backward (the same KL backward, so equal to rounding: TOL_GRAD). With
    q, k, v frozen (the warm-up's model) the output needs no gradient, so the trainer can skip the
    model's backward; with q, k, v trainable their gradients are the attach path's minus nothing (the KL
    never reaches them), so local is correct there too."""
    x = _inputs()
    names = ("q_idx", "w", "k_idx")
    ref = _run_core(_core(topk, "naive", stage), x, None)       # attach: LM-side backward delivers the KL
    for frozen in (True, False):
        core = _core(topk, backend, stage)  # triton, dense: the fused two-pass KL (interpreter on CPU)
        core.kl_backward = "local"
        t = {n: x[n].clone().requires_grad_(n in names or not frozen)
             for n in ("q", "k", "v", "q_idx", "w", "k_idx")}
        core.indexer_out = (t["q_idx"], t["w"], t["k_idx"])
        out = core(*(t[n].transpose(0, 1) for n in ("q", "k", "v")), None, packed_seq_params=None)
        for n in names:                                          # delivered before any backward call
            assert_close(n, ref[2][n], t[n].grad, TOL_GRAD)
        assert out.requires_grad is not frozen
        if not frozen:
            (out.view(S, 1, HQ, D).transpose(0, 1) * x["dout"]).sum().backward()
            for n in ("q", "k", "v"):
                assert_close(n, ref[2][n], t[n].grad, TOL_GRAD)
            for n in names:                                      # the LM-side backward adds nothing
                assert_close(n, ref[2][n], t[n].grad, TOL_GRAD)
    assert mdsa.use_local_kl_backward([torch.nn.Sequential(_core(topk, "naive", stage))]) == 1


@pytest.mark.parametrize("stage,topk,backend", [("sparse", 8, "naive"), ("sparse", 8, "triton"),
                                                 ("sparse", S, "naive"), ("dense_warmup", 8, "naive")])
def test_training_forward_without_autograd_computes_no_kl(stage, topk, backend, monkeypatch):
    """Full activation recompute runs each layer twice: first in training mode without autograd, then again with
    it in the backward. The first pass's KL could train nothing, so the layer computes none there (no call reaches
    the KL kernels' entry points, counted below), leaves last_kl to the pass with autograd, and returns the same
    output. In eval mode (a validation pass) the KL is still computed: it is the metric. skip_kl_without_grad=False
    (the benchmark's baseline) computes it in the first pass too."""
    import kernels.dsa as kd
    import kernels.dsa.fused as kf

    calls = []
    for mod in (kd, mdsa):  # dsa_attention's loss (sparse path); the layer's own dense-path KL
        monkeypatch.setattr(mod, "indexer_kl_loss", lambda *a, _real=mod.indexer_kl_loss, **k:
                            calls.append(1) or _real(*a, **k))
    # the sparse path with autograd on the Triton backend: the KL is computed in the attention's backward
    monkeypatch.setattr(kf, "attention_kl_bwd", lambda *a, _real=kf.attention_kl_bwd, **k:
                        calls.append(1) or _real(*a, **k))
    x = _inputs()
    core = _core(topk, backend, stage)

    def forward(core):
        core.indexer_out = (x["q_idx"], x["w"], x["k_idx"])
        return core(*(x[n].transpose(0, 1) for n in ("q", "k", "v")), None, packed_seq_params=None)

    core.last_kl = sentinel = torch.tensor(-1.0)
    with torch.no_grad():
        first = forward(core)
    assert calls == [] and core.last_kl is sentinel
    out, kl, _ = _run_core(core, x, None)                 # the recompute: with autograd, the KL and its gradient
    assert len(calls) == 1 and kl is not sentinel
    assert torch.equal(first.view(S, 1, HQ, D).transpose(0, 1), out)
    with torch.no_grad():
        forward(core.eval())
    # the training pass's KL summed its target over the KV groups with fp32 atomics (Triton backend on a GPU: any
    # order), the evaluation's in group order: equal to fp32 rounding
    assert len(calls) == 2 and torch.allclose(core.last_kl, kl, rtol=1e-6, atol=0)
    core.train().skip_kl_without_grad = False
    with torch.no_grad():
        forward(core)
    assert len(calls) == 3


@pytest.mark.parametrize("stage,backend", [("sparse", "naive"), ("sparse", "triton"), ("dense_warmup", "naive"),
                                           ("dense_warmup", "triton")])
def test_a_packed_rows_padding_trains_no_indexer(stage, backend):
    """A packed row's padding (document -1 in the trainer's PackedSeqDocuments) gives the indexer no gradient: the
    layer on the row with a padding segment (its last 10 tokens, no LM loss) gives its documents' tokens the
    outputs and the gradients of the same layer on the row without the padding, and the padding's rows none. Before,
    the padding's KL terms trained the indexer (its rows of q_idx and w had gradients; the check below)."""
    from models.moe.router import PackedSeqDocuments

    bounds, real = (0, 12, 30, 40), 30                           # documents of 12 and 18 tokens, 10 of padding
    x = _inputs()
    x["dout"][:, real:] = 0.0                                     # padding carries no LM loss
    ids = torch.repeat_interleave(torch.tensor([0, 1, -1]), torch.tensor([12, 18, 10])).view(1, -1).to(DEV)
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)
    packed = PackedSeqDocuments(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=18,
                                max_seqlen_kv=18, documents=ids, num_documents=3)
    out, _, grads = _run_core(_core(8, backend, stage), x, packed)    # top-k 8 < 12, 18: the sparse path
    y = {n: t[:, :real].contiguous() for n, t in x.items()}
    ref_out, _, ref = _run_core(_core(8, backend, stage), y, _packed(bounds[:-1], 18))
    assert_close("out", ref_out, out[:, :real], TOL_OUT)
    for name, g in ref.items():
        assert_close(name, g, grads[name][:, :real], TOL_GRAD)
        assert torch.equal(grads[name][:, real:], torch.zeros_like(grads[name][:, real:])), name


@pytest.mark.parametrize("stage,backend", [("sparse", "naive"), ("sparse", "triton"), ("dense_warmup", "naive"),
                                           ("dense_warmup", "triton")])
def test_the_padding_at_a_rows_end_is_not_attended_and_in_no_kl(stage, backend):
    """The padding the trainer names at a row's end (PackedSeqDocuments.pad_tail) is cut off before the layer's
    selection, attention and KL: the documents' tokens get the outputs, gradients and KL value of the same layer on
    the row without the padding (the KL there a mean over their 30 tokens, not over 40), and the padding a zero
    output and no gradient. Without pad_tail the KL's value counts the padding's 10 terms (checked: it differs)."""
    from models.moe.router import PackedSeqDocuments

    bounds, real = (0, 12, 30, 40), 30                           # documents of 12 and 18 tokens, 10 of padding
    x = _inputs()
    x["dout"][:, real:] = 0.0                                     # padding carries no LM loss
    ids = torch.repeat_interleave(torch.tensor([0, 1, -1]), torch.tensor([12, 18, 10])).view(1, -1).to(DEV)
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)

    def packed(tail):
        return PackedSeqDocuments(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=18,
                                  max_seqlen_kv=18, documents=ids, num_documents=3, pad_tail=tail,
                                  pad_tail_segments=1 if tail else 0)

    out, kl, grads = _run_core(_core(8, backend, stage), x, packed(S - real))   # top-k 8 < 12, 18: sparse path
    y = {n: t[:, :real].contiguous() for n, t in x.items()}
    ref_out, ref_kl, ref = _run_core(_core(8, backend, stage), y, _packed(bounds[:-1], 18))
    assert_close("out", ref_out, out[:, :real], TOL_OUT)
    assert torch.equal(out[:, real:], torch.zeros_like(out[:, real:]))
    assert_close("kl", ref_kl, kl, TOL_OUT)
    for name, g in ref.items():
        assert_close(name, g, grads[name][:, :real], TOL_GRAD)
        assert torch.equal(grads[name][:, real:], torch.zeros_like(grads[name][:, real:])), name
    _, kl_all, _ = _run_core(_core(8, backend, stage), x, packed(0))
    assert abs(float(kl_all) - float(ref_kl)) > 1e-3, (float(kl_all), float(ref_kl))
