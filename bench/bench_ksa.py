"""GPU benchmark of Kwai Summary Attention (KSA); prints a table and writes JSON.

    python bench/bench_ksa.py --out $OUT/ksa.json            # one H200, < ~5 minutes with compiles
    python bench/bench_ksa.py --out ksa.json --quick         # smoke run (small sizes)
    python bench/bench_ksa.py --out ksa.json --sweep         # also time a few kernel tile configs at 32K
    python bench/bench_ksa.py --out regs.json --compile-report  # no GPU: compile for sm_90, registers/spills

In one run:
1. correctness: the Triton kernel in bf16 against the fp32 mask reference (kernels/ksa/naive.py) at a
   moderate packed size; relative RMSE of o, dq, dk, dv with the tolerances printed beside them;
2. speed and peak memory at B=1, 32 query / 4 KV heads, head_dim 128, C=8, S=1, W=128, bf16, for
   32K and 128K TEXT tokens (the KSA sequence is 9/8 as long: summaries included) of
     - ksa    : our Triton kernels (forward; forward+backward),
     - dense  : causal SDPA (flash backend, GQA) on the text length alone,
     - trainer: the same call as the trainer's dense layers make (models/sdpa.py, SDPA's own backend choice:
                cuDNN on the H200 with torch 2.11), the dense attention a KSA layer replaces in training,
     - flex   : FlexAttention with the same KSA mask (compiled block mask, compiled flex_attention);
   times are triton.testing.do_bench medians; a failing case (OOM, compile error) is recorded in
   the JSON and the run goes on. Cases run in order of importance and are skipped, with a note,
   once the time budget (--budget-s) is spent.

FLOP convention: forward 4*D*pairs*Hq, forward+backward 3.5x that (backward = 2.5x forward, as
FlashAttention benchmarks count it), pairs = attending (query, key) pairs; our backward actually
runs 7 tile matmuls per pair (dq and dk/dv passes both recompute P) against 5 in FlashAttention-2.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from kernels.ksa import default_config, ksa_attention, ksa_attention_flex, ksa_flex_block_mask  # noqa: E402

HQ, HKV, D, CHUNK, NSUM = 32, 4, 128, 8, 1
TOL = {"o": 1e-2, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2}  # bf16 inputs, bf16 P/dS tile matmuls, fp32 accumulation


def interleaved_len(n_text: int) -> int:
    return n_text + NSUM * (n_text // CHUNK)


def ksa_pairs(n_text: int, window: int) -> int:
    """Attending (query, key) pairs of one head of one document with n_text text tokens."""
    t = torch.arange(n_text, dtype=torch.float64)
    c = torch.div(t, CHUNK, rounding_mode="floor")
    text_q = (torch.clamp(c, max=window) * CHUNK + t % CHUNK + 1 + torch.clamp(c - window, min=0) * NSUM).sum()
    chunks = n_text // CHUNK
    summary_q = chunks * sum(CHUNK + j + 1 for j in range(NSUM))
    return int(text_q.item()) + summary_q


def rel_rmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def peak_and_time(fn, *, grad_to_none=None, rep=100) -> dict:
    from triton.testing import do_bench

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    fn()  # compiles on first use
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    if grad_to_none:
        for x in grad_to_none:
            x.grad = None
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    if grad_to_none:
        for x in grad_to_none:
            x.grad = None
    ms = do_bench(fn, warmup=10, rep=rep, grad_to_none=grad_to_none, return_mode="median")
    return {"ms": ms, "peak_gb": peak / 1e9, "extra_gb": (peak - base) / 1e9, "first_call_s": first_s}


def make_inputs(n_tokens: int, heads_q: int, heads_kv: int, *, seed: int = 42):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(1, n_tokens, h, D, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return mk(heads_q), mk(heads_kv), mk(heads_kv), mk(heads_q)


# ---------------------------------------------------------------------------------------------
# 1. correctness
# ---------------------------------------------------------------------------------------------
def correctness(window: int, n_text_docs: tuple[int, ...]) -> dict:
    lengths = [interleaved_len(n) for n in n_text_docs]
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    q, k, v, do = make_inputs(T, HQ, HKV)
    kw = dict(chunk=CHUNK, window=window, num_summary=NSUM, cu_seqlens=cu)
    qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
    ref = ksa_attention(qr, kr, vr, backend="naive", **kw)
    ref.backward(do.float())
    ref_grads = [qr.grad, kr.grad, vr.grad]
    del qr, kr, vr
    qt, kt, vt = (x.clone().requires_grad_() for x in (q, k, v))
    out = ksa_attention(qt, kt, vt, backend="triton", **kw)
    out.backward(do)
    errs = {name: rel_rmse(r, t.float()) for name, r, t in
            zip(("o", "dq", "dk", "dv"), (ref.detach(), *ref_grads), (out.detach(), qt.grad, kt.grad, vt.grad))}
    finite = all(torch.isfinite(t).all().item() for t in (out, qt.grad, kt.grad, vt.grad))
    ok = finite and all(errs[n] <= TOL[n] for n in errs)
    del ref, ref_grads, out
    torch.cuda.empty_cache()
    return {"text_tokens_per_doc": list(n_text_docs), "tokens": T, "window": window, "rel_rmse": errs,
            "tolerance": TOL, "finite": finite, "status": "pass" if ok else "FAIL"}


# ---------------------------------------------------------------------------------------------
# 2. speed
# ---------------------------------------------------------------------------------------------
def run_ksa(n_text: int, window: int, config=None) -> dict:
    T = interleaved_len(n_text)
    q, k, v, do = make_inputs(T, HQ, HKV)
    kw = dict(chunk=CHUNK, window=window, num_summary=NSUM)
    if config is not None:
        from kernels.ksa.attention import ksa_attention_triton
        f = lambda a, b, c: ksa_attention_triton(a, b, c, config=config, **kw)  # noqa: E731
    else:
        f = lambda a, b, c: ksa_attention(a, b, c, backend="triton", **kw)  # noqa: E731
    res = {"tokens": T}
    res["fwd"] = peak_and_time(lambda: f(q, k, v))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    res["fwd_bwd"] = peak_and_time(lambda: f(qg, kg, vg).backward(do), grad_to_none=[qg, kg, vg])
    return res


def run_dense(n_text: int, flash: bool = True) -> dict:
    """Causal GQA SDPA on the text alone: forced to the flash backend, or (flash=False) the trainer's call
    (module docstring)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    from models.sdpa import sdpa

    q, k, v, do = make_inputs(n_text, HQ, HKV)
    q, k, v, do = (x.transpose(1, 2) for x in (q, k, v, do))  # [B, H, T, D] views
    gqa = {"enable_gqa": True}
    if not flash:
        mode = "models/sdpa.py, SDPA's default backend"
    else:
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], is_causal=True, **gqa)
            mode = "flash, enable_gqa"
        except RuntimeError:  # flash without native GQA in this build: expand K/V (same kernel time)
            k, v = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
            gqa, mode = {}, "flash, K/V expanded to 32 heads"

    def f(a, b, c):
        if not flash:
            return sdpa(a, b, c, is_causal=True, **gqa)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True, **gqa)

    res = {"tokens": n_text, "mode": mode}
    res["fwd"] = peak_and_time(lambda: f(q, k, v))
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    res["fwd_bwd"] = peak_and_time(lambda: f(qg, kg, vg).backward(do), grad_to_none=[qg, kg, vg])
    return res


def run_flex(n_text: int, window: int, flex_fn) -> dict:
    T = interleaved_len(n_text)
    t0 = time.perf_counter()
    block_mask = ksa_flex_block_mask(T, chunk=CHUNK, window=window, num_summary=NSUM, device="cuda",
                                     compile_builder=True)
    torch.cuda.synchronize()
    res = {"tokens": T, "block_mask_s": time.perf_counter() - t0}
    try:
        res["block_sparsity_pct"] = float(block_mask.sparsity())
    except Exception:  # noqa: BLE001 - informational only
        pass
    q, k, v, do = make_inputs(T, HQ, HKV)
    kw = dict(chunk=CHUNK, window=window, num_summary=NSUM, block_mask=block_mask, flex_fn=flex_fn)
    res["fwd"] = peak_and_time(lambda: ksa_attention_flex(q, k, v, **kw))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    res["fwd_bwd"] = peak_and_time(lambda: ksa_attention_flex(qg, kg, vg, **kw).backward(do),
                                   grad_to_none=[qg, kg, vg])
    return res


def sweep_configs(n_text: int, window: int) -> list[dict]:
    base = default_config(head_dim=D, group=HQ // HKV, dtype=torch.bfloat16, on_gpu=True)
    variants = {  # register-checked alternatives (compiled for sm_90 without spills unless noted)
        "default": {},
        "fwd_n128_s2": dict(fwd_block_n=128, fwd_stages=2),
        "fwd_s4": dict(fwd_stages=4),
        "dq_n32_s3": dict(dq_block_n=32, dq_stages=3),
        "dkdv_rows64": dict(dkdv_block_t=8),                      # spills 16 bytes
        "dkdv_n64_w4": dict(dkdv_block_n=64, dkdv_warps=4),
        "dkdv_s3": dict(dkdv_stages=3),
    }
    out = []
    for name, change in variants.items():
        cfg = base.with_(**change)
        try:
            r = run_ksa(n_text, window, cfg)
            out.append({"name": name, "config": cfg.__dict__, "fwd_ms": r["fwd"]["ms"],
                        "fwd_bwd_ms": r["fwd_bwd"]["ms"], "status": "ok"})
        except Exception as e:  # noqa: BLE001 - record and go on
            out.append({"name": name, "config": cfg.__dict__, "status": "error", "error": repr(e)[:400]})
        torch.cuda.empty_cache()
        print(f"sweep {name:16s} {out[-1].get('fwd_ms', float('nan')):8.2f} ms fwd  "
              f"{out[-1].get('fwd_bwd_ms', float('nan')):8.2f} ms fwd+bwd", flush=True)
    return out


def compile_report(config=None) -> list[dict]:
    """Compile the four kernels for sm_90 (H100/H200) WITHOUT a GPU: Triton frontend + the ptxas that
    ships with Triton. Reports registers, spills and shared memory of the bf16 D=128 G=8 configuration."""
    import re
    import subprocess
    import tempfile

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.ksa import attention as A

    cfg = config or default_config(head_dim=D, group=HQ // HKV, dtype=torch.bfloat16, on_gpu=True)
    common = dict(C=CHUNK, S=NSUM, G=HQ // HKV, GP=HQ // HKV, D=D, BLOCK_D=D, PREC="tf32", INTERPRET=False,
                  IDX=tl.int32)
    plan = [
        (A.ksa_fwd_kernel_attn, dict(common, BLOCK_T=cfg.fwd_block_t, BLOCK_N=cfg.fwd_block_n),
         cfg.fwd_warps, cfg.fwd_stages),
        (A.ksa_bwd_kernel_dq, dict(common, BLOCK_T=cfg.dq_block_t, BLOCK_N=cfg.dq_block_n), cfg.dq_warps,
         cfg.dq_stages),
        (A.ksa_bwd_kernel_dkdv, dict(common, BLOCK_N=cfg.dkdv_block_n, BLOCK_TQ=cfg.dkdv_block_t), cfg.dkdv_warps,
         cfg.dkdv_stages),
        (A.ksa_bwd_kernel_delta, dict(H=HQ, D=D, BLOCK_R=64, BLOCK_D=D), 4, 1),
    ]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    out = []
    for fn, consts, warps, stages in plan:
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
                continue
            if name in ("qk_scale", "sm_scale"):
                sig[name] = "fp32"
                continue
            sig[name] = ("*fp32" if name in ("LSE", "DELTA") else "*i32" if name in ("CU", "SCHED") else "*bf16") \
                if name.isupper() else "i32"
            if name not in ("window", "num_rows"):  # what the launcher's 16-divisibility specialisation gives
                attrs[(i,)] = [["tt.divisibility", 16]]
        row = {"kernel": fn.__name__, "warps": warps, "stages": stages}
        try:
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps, num_stages=stages))
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(k.asm["ptx"])
            info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                  text=True).stderr
            os.unlink(f.name)
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores", info)
            row.update(registers=int(regs.group(1)) if regs else None,
                       spill_store_bytes=int(spill.group(1)) if spill else None, shared_bytes=k.metadata.shared)
        except Exception as e:  # noqa: BLE001 - report and go on
            row.update(error=repr(e)[:400])
        out.append(row)
        print(row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4K and 8K text tokens")
    ap.add_argument("--window", type=int, default=128, help="W: previous chunks of raw text (default 128)")
    ap.add_argument("--skip-flex", action="store_true", help="leave out the FlexAttention baseline")
    ap.add_argument("--sweep", action="store_true", help="also time a few tile configs at the first size")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip remaining cases after this many seconds")
    ap.add_argument("--compile-report", action="store_true",
                    help="no GPU needed: compile the kernels for sm_90, report registers/spills/smem, exit")
    args = ap.parse_args()
    if args.compile_report:
        report = compile_report()
        with open(args.out, "w") as f:
            json.dump({"compile_report_sm90": report, "triton": __import__("triton").__version__}, f, indent=1)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_ksa needs a CUDA GPU")
    start = time.perf_counter()
    sizes = [4096, 8192] if args.quick else [32768, 131072]
    import triton

    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(),
        "shape": {"batch": 1, "heads_q": HQ, "heads_kv": HKV, "head_dim": D, "chunk": CHUNK, "num_summary": NSUM,
                  "window": args.window, "dtype": "bfloat16"},
        "kernel_config": default_config(head_dim=D, group=HQ // HKV, dtype=torch.bfloat16, on_gpu=True).__dict__,
        "flop_convention": "fwd = 4*D*Hq*pairs; fwd+bwd = 3.5 x fwd",
        "cases": [],
    }

    print("== correctness (bf16 Triton vs fp32 mask reference) ==", flush=True)
    try:
        docs = (1000, 1500) if args.quick else (1500, 2600)
        result["correctness"] = correctness(min(args.window, 16), docs)
    except Exception as e:  # noqa: BLE001
        result["correctness"] = {"status": "error", "error": repr(e)[:800], "trace": traceback.format_exc()[-2000:]}
    print(json.dumps(result["correctness"], indent=1, default=str), flush=True)

    from torch.nn.attention.flex_attention import flex_attention

    flex_fn = torch.compile(flex_attention, dynamic=False)  # compiled once per shape, on first use
    plan = [("ksa", n) for n in sizes] + [("dense", n) for n in sizes] + [("trainer", n) for n in sizes]
    if not args.skip_flex:
        plan += [("flex", n) for n in sizes]
    for method, n_text in plan:
        case = {"method": method, "text_tokens": n_text}
        if time.perf_counter() - start > args.budget_s:
            case.update(status="skipped", error=f"time budget of {args.budget_s:.0f} s spent")
            result["cases"].append(case)
            continue
        print(f"== {method} {n_text // 1024}K text tokens ==", flush=True)
        try:
            if method == "ksa":
                r = run_ksa(n_text, args.window)
                pairs = ksa_pairs(n_text, args.window)
            elif method in ("dense", "trainer"):
                r = run_dense(n_text, flash=method == "dense")
                pairs = n_text * (n_text + 1) // 2
            else:
                r = run_flex(n_text, args.window, flex_fn)
                pairs = ksa_pairs(n_text, args.window)
            flops = 4 * D * HQ * pairs
            r["tflops_fwd"] = flops / r["fwd"]["ms"] / 1e9
            r["tflops_fwd_bwd"] = 3.5 * flops / r["fwd_bwd"]["ms"] / 1e9
            case.update(r, status="ok", pairs_per_head=pairs)
        except Exception as e:  # noqa: BLE001 - OOM, compile errors: record and go on
            case.update(status="error", error=repr(e)[:800], trace=traceback.format_exc()[-2000:])
        result["cases"].append(case)
        torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in case.items() if k != "trace"}, default=str), flush=True)

    if args.sweep and time.perf_counter() - start < args.budget_s:
        result["sweep"] = sweep_configs(sizes[0], args.window)

    # speed-ups against the baselines (forward+backward, same text length)
    by = {(c["method"], c["text_tokens"]): c for c in result["cases"] if c.get("status") == "ok"}
    for n in sizes:
        ksa = by.get(("ksa", n))
        if ksa:
            for base in ("dense", "trainer", "flex"):
                if (base, n) in by:
                    ksa[f"speedup_vs_{base}_fwd_bwd"] = by[(base, n)]["fwd_bwd"]["ms"] / ksa["fwd_bwd"]["ms"]
                    ksa[f"speedup_vs_{base}_fwd"] = by[(base, n)]["fwd"]["ms"] / ksa["fwd"]["ms"]
    result["wall_s"] = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)

    print()
    print(f"correctness: {result['correctness'].get('status')}  "
          + "  ".join(f"{k} {v:.2e} (tol {TOL[k]:.0e})" for k, v in result["correctness"].get("rel_rmse", {}).items()))
    hdr = (f"{'method':7s} {'text':>6s} {'tokens':>7s} {'fwd ms':>9s} {'f+b ms':>9s} {'TF/s fwd':>9s} "
           f"{'TF/s f+b':>9s} {'peak GB f+b':>11s} {'x dense':>8s} {'x trainer':>9s} {'x flex':>7s}  status")
    print(hdr)
    print("-" * len(hdr))
    for c in result["cases"]:
        if c.get("status") != "ok":
            print(f"{c['method']:7s} {c['text_tokens'] // 1024:>5d}K {'':>7s} {c['status']}: {c.get('error', '')[:90]}")
            continue
        print(f"{c['method']:7s} {c['text_tokens'] // 1024:>5d}K {c['tokens']:>7d} {c['fwd']['ms']:>9.2f} "
              f"{c['fwd_bwd']['ms']:>9.2f} {c['tflops_fwd']:>9.1f} {c['tflops_fwd_bwd']:>9.1f} "
              f"{c['fwd_bwd']['peak_gb']:>11.2f} {c.get('speedup_vs_dense_fwd_bwd', math.nan):>8.2f} "
              f"{c.get('speedup_vs_trainer_fwd_bwd', math.nan):>9.2f} {c.get('speedup_vs_flex_fwd_bwd', math.nan):>7.2f}  ok")
    print(f"wall {result['wall_s']:.0f} s; JSON written to {args.out}")


if __name__ == "__main__":
    main()
