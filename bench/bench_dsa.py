"""GPU benchmark: DSA (kernels/dsa) against dense causal GQA attention (SDPA flash, and the trainer's own), one H200.

    python bench/bench_dsa.py --out $OUT/dsa.json            # L = 8K, 32K, 64K, 128K (~5 min)
    python bench/bench_dsa.py --quick --out $OUT/dsa.json    # smoke run: L = 8K only

1. bf16 correctness against kernels/dsa/naive.py (float64) at L = 2K (tolerances below).
2. Per length L, B = 1, 32 query / 4 KV heads, head dim 128, indexer 16 x 64, top-k 2048, bf16:
   DSA forward and forward+backward (top-k selection + union plan + sparse attention + sparse-stage
   indexer KL loss, as the model's layer runs it: the KL's target summed in the attention backward,
   kernels/dsa/fused.py, so the forward holds no loss), dense SDPA flash forward and forward+backward,
   peak memory of each, every DSA piece alone, the sparse-attention kernels' achieved TFLOP/s and GB/s
   against 775 TFLOP/s and 4.2 TB/s, and the prefill cost (top-k + plan + attention forward without the
   indexer loss, as inference runs it, against the dense forward; both without autograd). In the same
   run, "split": the loss with a forward of its own (indexer_loss.py, what the layer ran before), the
   baseline of the fused backward.
3. The same dense timings for the project's dense attention (models/sdpa.py, as the trainer calls it: SDPA's
   default backend choice; cuDNN on the H200 with torch 2.11, named in the JSON from a profile), which is what a
   DSA layer replaces in training. The issue's named baseline is SDPA flash; both are in every run.

Indexer inputs ("--data smooth", the default) are moving averages of Gaussian noise over 50
tokens (adjacent-token correlation 0.98) with RoPE applied: at 128K the top-2048 sets of 4 / 8 / 16
adjacent queries then cover 3,965 / 6,053 / 9,524 distinct keys (Keye-VL reports ~8K for 16 queries
of a trained indexer).
With "--data iid" adjacent selections barely overlap (the worst case for the union kernels); the
default run also times DSA forward+backward on iid inputs at 32K. Per-size failures (OOM, compile
errors) are recorded in the JSON and the run continues. Prints a table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kernels.dsa import (build_sparse_plan, default_block_q, dsa_topk,  # noqa: E402
                         indexer_kl_loss, naive, sparse_gqa_attention)
from kernels.dsa.fused import SparseAttentionKLFn, attention_kl_bwd  # noqa: E402
from kernels.dsa.indexer_loss import indexer_kl_bwd, indexer_kl_fwd  # noqa: E402
from kernels.dsa.sparse_attn import sparse_attn_bwd, sparse_attn_fwd  # noqa: E402
from models.sdpa import sdpa  # noqa: E402

PEAK_TFLOPS = 775.0   # measured bf16 matmul ceiling on the H200 (DESIGN.md)
PEAK_GBS = 4200.0     # measured device copy bandwidth
HQ, HKV, D, HI, DI, TOPK = 32, 4, 128, 16, 64, 2048
# bf16 tolerances (relative RMSE against float64 on the same bf16 inputs) and why
TOL = {
    "o": 1e-2,        # bf16 output, bf16 P in the PV product
    "lse": 1e-3,      # fp32 online log-sum-exp of bf16 logits
    "dq": 2e-2, "dk": 2e-2, "dv": 2e-2,  # bf16 dS / P operands, fp32 accumulation and atomics
    "loss": 1e-2,     # fp32 per-token KL from bf16 q / k / indexer inputs
    "dq_idx": 3e-2, "dw": 3e-2, "dk_idx": 3e-2,  # bf16 dI operands in the indexer backward
}


def smooth_noise(shape_rest, T, window, device, gen):
    """[T, *shape_rest] moving average of N(0, 1) noise over `window` tokens, unit variance."""
    e = torch.randn(T + window, *shape_rest, device=device, generator=gen, dtype=torch.float32)
    c = torch.cumsum(e.double(), dim=0)
    x = (c[window:] - c[:-window]) / math.sqrt(window)
    return x.float()


def rope(x, theta=10000.0):
    """Non-interleaved RoPE over the last dim of x [T, ..., d] at positions 0..T-1."""
    T, d = x.shape[0], x.shape[-1]
    half = d // 2
    inv = theta ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = torch.arange(T, device=x.device, dtype=torch.float32)[:, None] * inv[None]
    shape = [T] + [1] * (x.dim() - 2) + [half]
    c, s = ang.cos().view(shape), ang.sin().view(shape)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


def make_inputs(L, data="smooth", seed=42, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    bf = torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, device=device, generator=gen, dtype=torch.float32).to(bf)

    q, k, v = rnd(1, L, HQ, D), rnd(1, L, HKV, D), rnd(1, L, HKV, D)
    if data == "smooth":
        qi = rope(smooth_noise((HI, DI), L, 50, device, gen))
        ki = rope(smooth_noise((DI,), L, 50, device, gen))
        w = smooth_noise((HI,), L, 50, device, gen)
    elif data == "iid":
        qi = torch.randn(L, HI, DI, device=device, generator=gen)
        ki = torch.randn(L, DI, device=device, generator=gen)
        w = torch.randn(L, HI, device=device, generator=gen)
    else:
        raise ValueError(f"--data must be smooth or iid, got {data!r}")
    w = w * (HI ** -0.5) * (DI ** -0.5)  # the indexer module's scaling
    out = dict(q=q, k=k, v=v, q_idx=qi.unsqueeze(0).to(bf), w=w.unsqueeze(0).to(bf),
               k_idx=ki.unsqueeze(0).to(bf), do=rnd(1, L, HQ, D))
    for name in ("q", "k", "v", "q_idx", "w", "k_idx"):
        out[name].requires_grad_(True)
    return out


def dsa_forward_split(x, block_q):
    """The loss with a forward of its own (the baseline of the fused backward)."""
    idx = dsa_topk(x["q_idx"], x["w"], x["k_idx"], TOPK)
    plan = build_sparse_plan(idx, block_q)
    o, lse = sparse_gqa_attention(x["q"], x["k"], x["v"], idx, return_lse=True, plan=plan)
    loss = indexer_kl_loss(x["q"], x["k"], x["q_idx"], x["w"], x["k_idx"], stage="sparse",
                           idx=idx, lse=lse, plan=plan)
    return o, loss


def dsa_forward(x, block_q):
    """As the model's layer runs the sparse stage (dsa_attention(kl_in_backward=1)): the KL rides on o."""
    idx = dsa_topk(x["q_idx"], x["w"], x["k_idx"], TOPK)
    plan = build_sparse_plan(idx, block_q)
    kl = torch.full((), float("nan"), device=x["q"].device)
    o = SparseAttentionKLFn.apply(*(x[n] for n in ("q", "k", "v", "q_idx", "w", "k_idx")), plan, D ** -0.5,
                                  1.0, kl)
    return o, kl


def dsa_prefill(x, block_q):
    """What inference runs: top-k, union plan and sparse attention forward; no indexer loss, no
    autograd graph (the prefill that Keye-VL-2.0 and DeepSeek compare with dense attention)."""
    with torch.no_grad():
        idx = dsa_topk(x["q_idx"], x["w"], x["k_idx"], TOPK)
        plan = build_sparse_plan(idx, block_q)
        return sparse_gqa_attention(x["q"], x["k"], x["v"], idx, plan=plan)


def dense_prefill(x):
    with torch.no_grad():
        return dense_forward(x)


def dsa_fwd_bwd_split(x, block_q):
    o, loss = dsa_forward_split(x, block_q)
    return torch.autograd.grad([o, loss], [x[n] for n in ("q", "k", "v", "q_idx", "w", "k_idx")],
                               [x["do"], torch.ones_like(loss)])


def dsa_fwd_bwd(x, block_q):
    o, kl = dsa_forward(x, block_q)
    return torch.autograd.grad(o, [x[n] for n in ("q", "k", "v", "q_idx", "w", "k_idx")], x["do"])


def _sdpa(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                    enable_gqa=True)
        except (RuntimeError, TypeError):  # flash without GQA support: repeat the KV heads
            g = q.shape[1] // k.shape[1]
            return torch.nn.functional.scaled_dot_product_attention(
                q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=True)


def dense_forward(x):
    return _sdpa(x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2))


def dense_fwd_bwd(x, forward=dense_forward):
    o = forward(x)
    return torch.autograd.grad(o, [x["q"], x["k"], x["v"]], x["do"].transpose(1, 2))


def trainer_dense_forward(x):
    """The project's dense attention on an unpacked row (models/attention/dense.causal_attention without
    cu_seqlens): SDPA through models/sdpa.py with the backend torch picks."""
    return sdpa(x["q"].transpose(1, 2), x["k"].transpose(1, 2), x["v"].transpose(1, 2), is_causal=True,
                enable_gqa=True)


def sdpa_kernel_names(x):
    """The CUDA kernels one trainer_dense_forward launches (which backend torch picked)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        trainer_dense_forward(x)
        torch.cuda.synchronize()
    return sorted({ev.name[:120] for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA})


def timed(fn, quick=False):
    """Median milliseconds (triton.testing.do_bench: warm-up, then repeats)."""
    return do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")


def peak_mem(fn):
    """(peak bytes allocated during fn, peak minus bytes allocated before fn)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return peak, peak - before


def rel(ref, tri):
    ref, tri = ref.detach().double(), tri.detach().double()
    return ((ref - tri).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def check_correctness(L=2048):
    """bf16 kernels against the float64 reference on the same bf16 inputs."""
    x = make_inputs(L)
    res = {"L": L}
    qi, w, ki = (x[n].detach() for n in ("q_idx", "w", "k_idx"))
    idx = dsa_topk(qi, w, ki, TOPK)
    ref_idx = naive.topk_indices(qi, w, ki, TOPK)
    s = naive.index_scores(qi, w, ki)
    sel = naive.selection_mask(idx, L)
    elig = naive.eligible_mask(1, L, None, idx.device)
    worst_sel = torch.where(sel, s, torch.full_like(s, float("inf"))).amin(-1)
    best_out = torch.where(elig & ~sel, s, torch.full_like(s, float("-inf"))).amax(-1)
    res["topk_overlap_with_fp64"] = (sel & naive.selection_mask(ref_idx, L)).sum().item() / max(
        1, sel.sum().item())
    res["topk_max_rank_violation"] = (best_out - worst_sel).clamp_min(0).max().item()
    res["topk_valid"] = bool(((worst_sel >= best_out - 1e-4 * s.abs().max())).all())
    names = ("q", "k", "v")
    o, lse = sparse_gqa_attention(x["q"], x["k"], x["v"], idx, return_lse=True)
    g = torch.autograd.grad(o, [x[n] for n in names], x["do"])
    x64 = {n: x[n].detach().double().requires_grad_() for n in names}
    o_r, lse_r = naive.sparse_gqa_attention(x64["q"], x64["k"], x64["v"], idx)
    g_r = torch.autograd.grad(o_r, [x64[n] for n in names], x["do"].double())
    errs = {"o": rel(o_r, o), "lse": rel(lse_r, lse)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(names, g_r, g)})
    inames = ("q_idx", "w", "k_idx")
    loss = indexer_kl_loss(x["q"], x["k"], x["q_idx"], x["w"], x["k_idx"], stage="sparse",
                           idx=idx, lse=lse)
    gl = torch.autograd.grad(loss, [x[n] for n in inames])
    i64 = {n: x[n].detach().double().requires_grad_() for n in inames}
    loss_r = naive.indexer_kl_loss(x["q"].detach(), x["k"].detach(), i64["q_idx"], i64["w"],
                                   i64["k_idx"], "sparse", idx_BTK=idx, lse_BTH=lse)
    gl_r = torch.autograd.grad(loss_r, [i64[n] for n in inames])
    errs["loss"] = rel(loss_r.reshape(1), loss.reshape(1))
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip(inames, gl_r, gl)})
    # the fused backward (the layer's path): all six gradients and the KL it fills, against the same references
    o_f, kl_f = dsa_forward(x, default_block_q(HQ, HKV))
    g_f = torch.autograd.grad(o_f, [x[n] for n in names + inames], x["do"])
    errs["loss_fused"] = rel(loss_r.reshape(1), kl_f.reshape(1))
    errs.update({f"d{n}_fused": rel(a, b) for n, a, b in zip(names + inames, g_r + gl_r, g_f)})
    res["rel_rmse"] = errs
    res["tolerance"] = TOL
    res["pass"] = res["topk_valid"] and all(errs[n] <= TOL[n] for n in TOL) and all(
        errs[f"{n}_fused"] <= TOL[n] for n in TOL if n not in ("o", "lse"))
    return res


def attention_counts(plan, L):
    """Useful and executed flops and bytes of the sparse-attention forward / backward kernels."""
    t = torch.arange(L, device="cuda")
    n_sel = torch.clamp(t + 1, max=TOPK).sum().item()  # selected (query, key) pairs
    union = plan.pos_U.numel()                         # distinct (block, key) pairs
    G = HQ // HKV
    useful_fwd = 4.0 * D * HQ * n_sel
    exec_fwd = 4.0 * D * union * plan.block_q * G * HKV
    qo = 2.0 * L * HQ * D * 2                           # read q, write o (bf16)
    gather = union * HKV * D * 2.0 * 2                  # K and V rows, once per block and group
    return dict(
        pairs=n_sel, union_entries=union, mean_union_per_block=union / plan.num_blocks,
        useful_flops_fwd=useful_fwd, executed_flops_fwd=exec_fwd,
        useful_flops_bwd=2.5 * useful_fwd, executed_flops_bwd=2.5 * exec_fwd,
        bytes_fwd=qo + gather + union * 8.0 * HKV,
        bytes_bwd=2 * qo + L * HQ * D * 2.0 + gather + union * HKV * D * 4.0 * 2,
    )


def bench_size(L, quick, block_q):
    r = {"L": L}
    x = make_inputs(L)
    r["dense_fwd_ms"] = timed(lambda: dense_forward(x), quick)
    r["dense_fwd_bwd_ms"] = timed(lambda: dense_fwd_bwd(x), quick)
    r["dense_peak_bytes"], r["dense_extra_bytes"] = peak_mem(lambda: dense_fwd_bwd(x))
    r["dsa_fwd_ms"] = timed(lambda: dsa_forward(x, block_q), quick)
    r["dsa_fwd_bwd_ms"] = timed(lambda: dsa_fwd_bwd(x, block_q), quick)
    r["dense_prefill_ms"] = timed(lambda: dense_prefill(x), quick)
    r["dsa_prefill_ms"] = timed(lambda: dsa_prefill(x, block_q), quick)
    r["prefill_cost_ratio"] = r["dsa_prefill_ms"] / r["dense_prefill_ms"]
    r["dsa_peak_bytes"], r["dsa_extra_bytes"] = peak_mem(lambda: dsa_fwd_bwd(x, block_q))
    r["speedup_fwd_bwd"] = r["dense_fwd_bwd_ms"] / r["dsa_fwd_bwd_ms"]
    # the baseline of the fused backward, the same run: the loss with a forward of its own
    r["split_fwd_ms"] = timed(lambda: dsa_forward_split(x, block_q), quick)
    r["split_fwd_bwd_ms"] = timed(lambda: dsa_fwd_bwd_split(x, block_q), quick)
    r["split_peak_bytes"], _ = peak_mem(lambda: dsa_fwd_bwd_split(x, block_q))
    r["split_over_fused_fwd_bwd"] = r["split_fwd_bwd_ms"] / r["dsa_fwd_bwd_ms"]
    r["speedup_fwd_bwd_split"] = r["dense_fwd_bwd_ms"] / r["split_fwd_bwd_ms"]
    # the trainer's dense attention (module docstring, 3.)
    r["trainer_dense_kernels"] = sdpa_kernel_names(x)
    r["trainer_dense_fwd_ms"] = timed(lambda: trainer_dense_forward(x), quick)
    r["trainer_dense_fwd_bwd_ms"] = timed(lambda: dense_fwd_bwd(x, trainer_dense_forward), quick)
    r["trainer_dense_peak_bytes"], _ = peak_mem(lambda: dense_fwd_bwd(x, trainer_dense_forward))
    with torch.no_grad():
        r["trainer_dense_prefill_ms"] = timed(lambda: trainer_dense_forward(x), quick)
    r["speedup_fwd_bwd_vs_trainer_dense"] = r["trainer_dense_fwd_bwd_ms"] / r["dsa_fwd_bwd_ms"]
    r["prefill_cost_ratio_vs_trainer_dense"] = r["dsa_prefill_ms"] / r["trainer_dense_prefill_ms"]
    # the pieces, each alone
    qi, w, ki = (x[n].detach() for n in ("q_idx", "w", "k_idx"))
    q, k, v, do = (x[n].detach() for n in ("q", "k", "v", "do"))
    stats = {}
    idx = dsa_topk(qi, w, ki, TOPK, stats=stats)
    r["topk_fallback_rows"] = stats.get("fallback_rows")
    plan = build_sparse_plan(idx, block_q)
    scale = D ** -0.5
    o, lse = sparse_attn_fwd(q, k, v, plan, scale)
    kl, lse_i, z, psum = indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale,
                                        keep_psum=True)
    gscale = torch.full((1,), 1.0 / L, device=q.device)
    pieces = {
        "topk_select": lambda: dsa_topk(qi, w, ki, TOPK),
        "union_plan": lambda: build_sparse_plan(idx, block_q),
        "attn_fwd": lambda: sparse_attn_fwd(q, k, v, plan, scale),
        "attn_bwd": lambda: sparse_attn_bwd(q, k, v, o, do, lse, plan, scale),
        "loss_fwd": lambda: indexer_kl_fwd(qi, w, ki, q, k, lse, plan, scale,
                                           keep_psum=True),
        "loss_bwd": lambda: indexer_kl_bwd(qi, w, ki, q, k, lse, plan, scale,
                                           lse_i, z, gscale, psum=psum),
        # the fused backward: attention backward + the KL's target, then the KL's kernels (fused.py)
        "attn_kl_bwd": lambda: attention_kl_bwd(q, k, v, o, do, lse, qi, w, ki, plan, scale, gscale),
        # its fp32 P in 1 GiB chunks instead of 256 MiB (fewer launches, 0.75 GiB more transient)
        "attn_kl_bwd_1g": lambda: attention_kl_bwd(q, k, v, o, do, lse, qi, w, ki, plan, scale, gscale,
                                                   chunk_bytes=1 << 30),
    }
    r["pieces_ms"] = {name: timed(fn, quick) for name, fn in pieces.items()}
    c = attention_counts(plan, L)
    r["attention_counts"] = c
    for phase in ("fwd", "bwd"):
        ms = r["pieces_ms"][f"attn_{phase}"]
        r[f"attn_{phase}_useful_tflops"] = c[f"useful_flops_{phase}"] / ms / 1e9
        r[f"attn_{phase}_executed_tflops"] = c[f"executed_flops_{phase}"] / ms / 1e9
        r[f"attn_{phase}_gbs"] = c[f"bytes_{phase}"] / ms / 1e6
    return r  # the caller empties the CUDA cache once these locals are gone


def bench_iid(L, quick, block_q):
    x = make_inputs(L, data="iid")
    idx = dsa_topk(x["q_idx"].detach(), x["w"].detach(), x["k_idx"].detach(), TOPK)
    plan = build_sparse_plan(idx, block_q)
    return {"L": L, "data": "iid", "mean_union_per_block": plan.mean_union(),
            "dsa_fwd_bwd_ms": timed(lambda: dsa_fwd_bwd(x, block_q), quick),
            "dense_fwd_bwd_ms": timed(lambda: dense_fwd_bwd(x), quick),
            "trainer_dense_fwd_bwd_ms": timed(lambda: dense_fwd_bwd(x, trainer_dense_forward), quick)}


def _record_failure(results, key, L, e):
    results[key].append({"L": L, "error": f"{type(e).__name__}: {str(e)[:500]}",
                         "trace": traceback.format_exc()[-2000:]})
    torch.cuda.empty_cache()


def print_table(res):
    gib = 1024 ** 3
    print("\nDSA (top-k 2048, 32q/4kv heads, d128, indexer 16x64, bf16) vs dense SDPA flash, B=1")
    c = res.get("correctness", {})
    if c:
        print(f"correctness at L={c.get('L')}: {'PASS' if c.get('pass') else 'FAIL'}  "
              + "  ".join(f"{k}={v:.1e}" for k, v in c.get("rel_rmse", {}).items()))
    hdr = (f"{'L':>7} | {'dense fwd':>9} {'dense f+b':>9} {'dense GiB':>9} | {'DSA fwd':>8} "
           f"{'DSA f+b':>8} {'DSA GiB':>8} {'speedup':>7} | {'topk':>6} {'plan':>5} {'attF':>6} "
           f"{'attB':>6} {'lossF':>6} {'lossB':>6} | {'attF TF/s':>9} {'attF GB/s':>9} "
           f"{'attB TF/s':>9} {'union/blk':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in res["sizes"]:
        if "error" in r:
            print(f"{r['L']:>7} | FAILED: {r['error'][:150]}")
            continue
        p = r["pieces_ms"]
        print(f"{r['L']:>7} | {r['dense_fwd_ms']:9.2f} {r['dense_fwd_bwd_ms']:9.2f} "
              f"{r['dense_peak_bytes'] / gib:9.2f} | {r['dsa_fwd_ms']:8.2f} "
              f"{r['dsa_fwd_bwd_ms']:8.2f} {r['dsa_peak_bytes'] / gib:8.2f} "
              f"{r['speedup_fwd_bwd']:7.2f} | "
              f"{p['topk_select']:6.1f} {p['union_plan']:5.1f} {p['attn_fwd']:6.1f} "
              f"{p['attn_bwd']:6.1f} {p['loss_fwd']:6.1f} {p['loss_bwd']:6.1f} | "
              f"{r['attn_fwd_useful_tflops']:9.1f} {r['attn_fwd_gbs']:9.0f} "
              f"{r['attn_bwd_useful_tflops']:9.1f} "
              f"{r['attention_counts']['mean_union_per_block']:9.0f}")
    for r in (r for r in res["sizes"] if "error" not in r):
        print(f"prefill (top-k + plan + attention forward, no loss, no grad) L={r['L']}: DSA "
              f"{r['dsa_prefill_ms']:.2f} ms vs dense {r['dense_prefill_ms']:.2f} ms = "
              f"{r['prefill_cost_ratio']:.3f}x of dense ({1 / r['prefill_cost_ratio']:.2f}x cheaper)")
        print(f"the trainer's dense attention L={r['L']}: fwd {r['trainer_dense_fwd_ms']:.2f} ms, f+b "
              f"{r['trainer_dense_fwd_bwd_ms']:.2f} ms, {r['trainer_dense_peak_bytes'] / gib:.2f} GiB; DSA f+b at "
              f"{r['speedup_fwd_bwd_vs_trainer_dense']:.2f}x its speed, prefill "
              f"{r['prefill_cost_ratio_vs_trainer_dense']:.3f}x of it; kernels {r['trainer_dense_kernels']}")
    for r in res.get("iid", []):
        if "error" in r:
            print(f"iid L={r['L']}: FAILED {r['error'][:150]}")
        else:
            print(f"iid inputs, L={r['L']}: DSA fwd+bwd {r['dsa_fwd_bwd_ms']:.2f} ms vs dense "
                  f"{r['dense_fwd_bwd_ms']:.2f} ms (the trainer's {r['trainer_dense_fwd_bwd_ms']:.2f}), "
                  f"union/block {r['mean_union_per_block']:.0f}")
    for r in (r for r in res["sizes"] if "error" not in r):
        p = r["pieces_ms"]
        print(f"fused backward L={r['L']}: DSA f+b {r['dsa_fwd_bwd_ms']:.2f} ms against the split loss's "
              f"{r['split_fwd_bwd_ms']:.2f} ms ({r['split_over_fused_fwd_bwd']:.3f}x; dense over split "
              f"{r['speedup_fwd_bwd_split']:.2f}x); peak {r['dsa_peak_bytes'] / gib:.2f} vs "
              f"{r['split_peak_bytes'] / gib:.2f} GiB; attention+KL backward {p['attn_kl_bwd']:.1f} ms against "
              f"attB + lossF + lossB {p['attn_bwd'] + p['loss_fwd'] + p['loss_bwd']:.1f} ms")
    print("times in ms (median); GiB = peak allocated during one forward+backward (inputs "
          "included); TF/s counts useful flops (selected pairs); ceilings 775 TF/s, 4200 GB/s")


def main():
    ap = argparse.ArgumentParser(description="DSA vs dense attention benchmark (one GPU)")
    ap.add_argument("--out", default="dsa.json")
    ap.add_argument("--quick", action="store_true", help="smoke run: L = 8K only, short timing")
    ap.add_argument("--sizes", default=None, help="comma-separated lengths (default 8K..128K)")
    ap.add_argument("--block-q", type=int, default=None, help="tokens per union block")
    ap.add_argument("--no-iid", action="store_true", help="skip the iid-input run at 32K")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_dsa.py needs a CUDA GPU")
    t_start = time.time()
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else [8192] if args.quick else [8192, 32768, 65536, 131072])
    block_q = args.block_q or default_block_q(HQ, HKV)
    res = {"command": " ".join(sys.argv), "device": torch.cuda.get_device_name(),
           "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "block_q": block_q, "topk": TOPK,
           "heads": dict(q=HQ, kv=HKV, d=D, idx_heads=HI, idx_dim=DI), "data": "smooth",
           "sizes": [], "iid": []}
    try:
        res["correctness"] = check_correctness(2048)
    except Exception as e:  # keep benchmarking; the failure is in the JSON
        res["correctness"] = {"pass": False, "error": f"{type(e).__name__}: {str(e)[:500]}",
                              "trace": traceback.format_exc()[-2000:]}
    torch.cuda.empty_cache()
    print(f"correctness: {json.dumps(res['correctness'], default=str)[:600]}", flush=True)
    for L in sizes:
        try:
            r = bench_size(L, args.quick, block_q)
            res["sizes"].append(r)
            print(f"L={L}: dense f+b {r['dense_fwd_bwd_ms']:.1f} ms, DSA f+b "
                  f"{r['dsa_fwd_bwd_ms']:.1f} ms ({time.time() - t_start:.0f}s elapsed)",
                  flush=True)
        except Exception as e:  # OOM or compile failure at this size: record and go on
            _record_failure(res, "sizes", L, e)
            print(f"L={L}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        torch.cuda.empty_cache()
    if not args.quick and not args.no_iid:
        try:
            res["iid"].append(bench_iid(32768, args.quick, block_q))
        except Exception as e:
            _record_failure(res, "iid", 32768, e)
        torch.cuda.empty_cache()
    res["wall_seconds"] = time.time() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print_table(res)
    print(f"wrote {args.out} ({res['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
