"""Benchmark: one MoE layer (SequentialMLP vs GroupedExperts) and the LM loss (megatron's full logits vs the
chunked loss), at Keye-30B-A3B sizes on one GPU.

    python bench/bench_moe.py --out $OUT/moe.json                 # GPU: 8K and 32K tokens, bf16 (a few minutes)
    python bench/bench_moe.py --smoke --out /tmp/moe_smoke.json   # CPU or GPU: tiny sizes, seconds to a minute

1. Checks (GPU, bf16, small shapes; recorded, never fatal):
   - GroupedExperts (torch_grouped_mm, triton) against SequentialMLP with the same weights, one expert
     without tokens: relative RMSE of output, d_input, d_probs, d_w13, d_w2 (bf16 bound 2e-2: bf16 GEMM
     outputs and activations; SequentialMLP rounds the activation three times, GroupedExperts once).
   - torch._grouped_mm itself: forward with group sizes that are not multiples of 8/16, and the 2D x 2D
     weight-gradient form with an empty group (does the kernel write zeros there? GroupedExperts zeroes
     empty groups itself either way).
   - the chunked loss against megatron's loss in bf16 (loss and gradients).
2. MoE timing, per token count (8K, 32K; hidden 2048, 128 experts top-8, FFN 768, bf16, EP1):
   - "layer": megatron MoELayer (router, alltoall dispatcher, experts) forward+backward;
   - "experts": the experts module alone on pre-sorted tokens (random top-8 routing), forward and
     forward+backward, with achieved TFLOP/s (expert GEMMs only: 6*R*H*F forward, 3x that with backward,
     R = tokens * top-k) against the 775 TFLOP/s bf16 ceiling;
   for impl in sequential (megatron's loop), torch_grouped_mm, triton; peak memory above the inputs.
3. Padding (`bench_padding`): the MoE layer on an 8K / 32K packed row with 10% / 25% padding, forward+backward
   with the row's documents (padding routed to no expert) against without (padding routed as any token).
4. Loss timing, per token count (8K, 32K; vocab 151936, hidden 2048, bf16): megatron's path (logits =
   h @ W^T in bf16, then tensor_parallel.vocab_parallel_cross_entropy) vs chunked_cross_entropy (chunk
   4096 and 8192 tokens): forward+backward time and peak memory above the inputs.

Every case catches its own failure (missing torch._grouped_mm, a rejected shape, OOM) and records it in
the JSON with the error; the run goes on. The checks run in a child process (a device-side assert would
poison this process's CUDA context), and the JSON is rewritten after every section. Prints a table last. --smoke runs all of it at toy sizes (fp32
and the Triton interpreter on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


PEAK_TFLOPS = 775.0  # measured bf16 matmul ceiling on the H200 (DESIGN.md)
GPU = torch.cuda.is_available()
IMPLS = ("sequential", "torch_grouped_mm", "triton")


# ---------------------------------------------------------------------------------------------- setup
def setup_megatron():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 200))
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from parallel.groups import init_distributed

    device = init_distributed()
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(42)
    return device, ProcessGroupCollection.use_mpu_process_groups()


def lm_sizes(smoke: bool) -> dict:
    if smoke:
        return dict(hidden=64, experts=8, topk=2, ffn=32, vocab=1000, tokens=[40], chunks=[16, 40])
    return dict(hidden=2048, experts=128, topk=8, ffn=768, vocab=151936, tokens=[8192, 32768], chunks=[4096, 8192])


def transformer_config(sz: dict, dtype: torch.dtype):
    from models.config import LMConfig, ModelParallelSizes
    from models.lm import transformer_config as tc

    lm = LMConfig(num_layers=1, hidden_size=sz["hidden"], num_attention_heads=32 if sz["hidden"] >= 2048 else 4,
                  num_query_groups=4 if sz["hidden"] >= 2048 else 2, head_dim=128 if sz["hidden"] >= 2048 else 16,
                  vocab_size=sz["vocab"], num_experts=sz["experts"], moe_topk=sz["topk"],
                  moe_ffn_hidden_size=sz["ffn"], mrope_section=[16, 24, 24] if sz["hidden"] >= 2048 else [2, 3, 3])
    return tc(lm, ModelParallelSizes(), bf16=dtype == torch.bfloat16, use_cpu_initialization=not GPU)


def build_experts(impl, cfg, pgs, num_experts):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from models.moe.grouped_experts import GroupedExperts

    if impl == "sequential":
        spec = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False).submodules.experts
        return build_module(spec, num_experts, cfg, pg_collection=pgs)
    return GroupedExperts(num_experts, cfg, pg_collection=pgs, impl=impl)


def build_layer(impl, cfg, pgs, num_experts):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.spec_utils import build_module

    from models.moe.spec import moe_module_spec

    spec = (get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)
            if impl == "sequential" else moe_module_spec(num_experts=num_experts, experts_impl=impl))
    return build_module(spec, config=cfg, pg_collection=pgs)


@torch.no_grad()
def copy_weights(seq, grp):
    for i, e in enumerate(seq.local_experts):
        grp.w13[i].copy_(e.linear_fc1.weight)
        grp.w2[i].copy_(e.linear_fc2.weight)


def routed_inputs(tokens, sz, device, dtype, *, empty_expert=None, seed=0):
    """Tokens already sorted by expert (random top-k routing); counts on the CPU, as the dispatcher gives them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scores = torch.rand(tokens, sz["experts"], generator=g)
    if empty_expert is not None:
        scores[:, empty_expert] = -1.0
    experts = scores.topk(sz["topk"], dim=-1).indices.flatten()
    counts = torch.bincount(experts, minlength=sz["experts"])
    rows = experts.numel()
    gd = torch.Generator(device=device).manual_seed(seed)  # big tensors drawn on the device
    x = torch.randn(rows, sz["hidden"], generator=gd, device=device).to(dtype)
    probs = torch.rand(rows, generator=gd, device=device)
    dy = torch.randn(rows, sz["hidden"], generator=gd, device=device).to(dtype)
    return x, counts, probs, dy


# ---------------------------------------------------------------------------------------------- timing
def sync():
    if GPU:
        torch.cuda.synchronize()


def timed(fn, *, warmup=2, reps=5) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup if GPU else 1):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_gb(fn) -> float | None:
    if not GPU:
        return None
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def rel(ref, got) -> float:
    ref, got = ref.detach().double(), got.detach().double()
    if ref.shape != got.shape:
        return float("inf")
    return float((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30))


def record_failure(out: dict, key: str, e: BaseException) -> None:
    out[key] = {"error": f"{type(e).__name__}: {e}"[:500], "traceback": traceback.format_exc()[-2000:]}
    if GPU:
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- checks
def run_experts(m, x, counts, probs, dy):
    xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    y, _ = m(xi, counts.clone(), pi)
    y.backward(dy)
    if hasattr(m, "w13"):
        w13, w2 = m.w13.grad, m.w2.grad
    else:
        w13 = torch.stack([e.linear_fc1.weight.grad for e in m.local_experts])
        w2 = torch.stack([e.linear_fc2.weight.grad for e in m.local_experts])
    return {"output": y.detach(), "d_input": xi.grad, "d_probs": pi.grad, "d_w13": w13, "d_w2": w2}


def checks(pgs, device, dtype, smoke, out: dict, dump=lambda: None) -> dict:
    """Fills `out`, calling dump() after each check; the raw torch._grouped_mm probe (the one that could
    hit a device-side assert) runs last."""
    sz = dict(hidden=64, experts=8, topk=2, ffn=32, vocab=1000) if smoke else \
        dict(hidden=256, experts=16, topk=4, ffn=128, vocab=4096)
    cfg = transformer_config(sz, dtype)
    seq = build_experts("sequential", cfg, pgs, sz["experts"]).to(device)
    x, counts, probs, dy = routed_inputs(500 if not smoke else 40, sz, device, dtype, empty_expert=3)
    want = run_experts(seq, x, counts, probs, dy)
    for impl in IMPLS[1:]:
        try:
            grp = build_experts(impl, cfg, pgs, sz["experts"]).to(device)
            copy_weights(seq, grp)
            got = run_experts(grp, x, counts, probs, dy)
            res = {k: rel(want[k], got[k]) for k in want}
            res["empty_expert_grads_zero"] = bool((got["d_w13"][3] == 0).all() and (got["d_w2"][3] == 0).all())
            out[f"experts_vs_sequential/{impl}"] = res
        except Exception as e:  # noqa: BLE001
            record_failure(out, f"experts_vs_sequential/{impl}", e)
        dump()
    try:
        out["chunked_ce_vs_megatron"] = ce_check(device, dtype, sz)
    except Exception as e:  # noqa: BLE001
        record_failure(out, "chunked_ce_vs_megatron", e)
    dump()
    try:
        out["torch_grouped_mm_raw"] = raw_grouped_mm_check(device, dtype)
    except Exception as e:  # noqa: BLE001
        record_failure(out, "torch_grouped_mm_raw", e)
    dump()
    return out


def raw_grouped_mm_check(device, dtype) -> dict:
    if not hasattr(torch, "_grouped_mm"):
        return {"error": f"torch {torch.__version__} has no torch._grouped_mm"}
    g = torch.Generator(device="cpu").manual_seed(1)
    res = {}
    sizes = [5, 0, 27, 32]  # not multiples of 8/16, one empty group
    rows = sum(sizes)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32).to(device)
    x = torch.randn(rows, 64, generator=g).to(device, dtype)
    w = torch.randn(4, 128, 64, generator=g).to(device, dtype)  # [E, N, K]
    try:
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
        ref = torch.cat([x[s:e].float() @ w[i].float().t() for i, (s, e) in enumerate(zip([0, 5, 5, 32], [5, 5, 32, 64]))])
        res["fwd_2d3d_odd_groups_rel"] = rel(ref, y)
    except Exception as e:  # noqa: BLE001
        res["fwd_2d3d_odd_groups_error"] = f"{type(e).__name__}: {e}"[:300]
    dy = torch.randn(rows, 128, generator=g).to(device, dtype)
    try:
        dw = torch._grouped_mm(dy.t(), x, offs=offs)  # [E, 128, 64], the weight-gradient form
        ref = torch.stack([dy[s:e].float().t() @ x[s:e].float() for s, e in zip([0, 5, 5, 32], [5, 5, 32, 64])])
        nonempty = [0, 2, 3]
        res["wgrad_2d2d_rel_nonempty"] = rel(ref[nonempty], dw[nonempty])
        res["wgrad_2d2d_empty_group_written_as_zero"] = bool((dw[1] == 0).all())
    except Exception as e:  # noqa: BLE001
        res["wgrad_2d2d_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def megatron_loss(hidden, weight, labels):
    from megatron.core import tensor_parallel

    logits = hidden @ weight.t()  # [s, b, V] in the compute dtype, as the output layer produces
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def ce_check(device, dtype, sz) -> dict:
    from models.moe.chunked_ce import chunked_cross_entropy

    g = torch.Generator(device="cpu").manual_seed(2)
    n, h, v = 300, sz["hidden"], sz["vocab"]
    hidden = torch.randn(n, 1, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * h ** -0.5).to(device, dtype)
    labels = torch.randint(0, v, (n, 1), generator=g).to(device)
    grad = torch.rand(n, 1, generator=g).to(device)
    res = []
    for fn in (lambda a, b: megatron_loss(a, b, labels), lambda a, b: chunked_cross_entropy(a, b, labels, chunk_tokens=64)):
        a, b = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward(grad)
        res.append((loss.detach(), a.grad, b.grad))
    return {k: rel(r, o) for k, r, o in zip(("loss", "d_hidden", "d_weight"), *res)}


# ------------------------------------------------------------------------------------------- MoE timing
def expert_flops(rows, sz) -> float:
    return 6.0 * rows * sz["hidden"] * sz["ffn"]


def bench_moe(pgs, device, dtype, sz, impls, out) -> None:
    cfg = transformer_config(sz, dtype)
    reps = 3 if GPU else 1
    for tokens in sz["tokens"]:
        x, counts, probs, dy = routed_inputs(tokens, sz, device, dtype)
        rows = x.shape[0]
        for impl in impls:
            key = f"experts/{tokens}/{impl}"
            try:
                m = build_experts(impl, cfg, pgs, sz["experts"]).to(device)
                xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()

                def fwd():
                    with torch.no_grad():
                        m(x, counts, probs)

                def fwd_bwd():
                    y, _ = m(xi, counts, pi)
                    y.backward(dy)

                f_ms = timed(fwd, reps=reps)
                fb_ms = timed(fwd_bwd, reps=reps)
                m.zero_grad(set_to_none=True)
                xi.grad = pi.grad = None
                out[key] = {"tokens": tokens, "rows": rows, "impl": impl, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms,
                            "fwd_tflops": expert_flops(rows, sz) / f_ms / 1e9,
                            "fwd_bwd_tflops": 3 * expert_flops(rows, sz) / fb_ms / 1e9,
                            "peak_gb": peak_gb(fwd_bwd)}
                m = None  # frees the experts before the next build; the closures above are done with it
            except Exception as e:  # noqa: BLE001
                record_failure(out, key, e)
        x = probs = dy = None
        hidden = torch.randn(tokens, 1, sz["hidden"], device=device, dtype=dtype)
        dh = torch.randn_like(hidden)
        for impl in impls:
            key = f"layer/{tokens}/{impl}"
            try:
                layer = build_layer(impl, cfg, pgs, sz["experts"]).to(device)
                hi = hidden.clone().requires_grad_()

                def layer_fwd_bwd():
                    y, _ = layer(hi)
                    y.backward(dh)

                ms = timed(layer_fwd_bwd, reps=reps)
                layer.zero_grad(set_to_none=True)
                hi.grad = None
                out[key] = {"tokens": tokens, "impl": impl, "fwd_bwd_ms": ms,
                            "expert_tflops": 3 * expert_flops(tokens * sz["topk"], sz) / ms / 1e9,
                            "peak_gb": peak_gb(layer_fwd_bwd)}
                layer = None
            except Exception as e:  # noqa: BLE001
                record_failure(out, key, e)


def bench_padding(pgs, device, dtype, sz, out, fractions=(0.1, 0.25)) -> None:
    """The MoE layer (experts_impl auto) forward+backward on one packed row whose last `fraction` of tokens is
    padding (one repeated vector, as a pad token's hidden state is; no gradient from it): the row's documents given
    (models/moe/router.py: padding routed to no expert) against none (every token routed, as before that change),
    the same layer and inputs in the same run; and the relative RMSE of the documents' outputs and input gradients
    between the two (the gradients differ by the balancing loss's part, which no longer counts the padding)."""
    from models.moe.router import PackedSeqDocuments

    cfg = transformer_config(sz, dtype)
    reps = 3 if GPU else 1
    for tokens in sz["tokens"]:
        for fraction in fractions:
            key = f"padding/{tokens}/{fraction}"
            real = tokens - int(tokens * fraction)
            try:
                layer = build_layer("auto", cfg, pgs, sz["experts"]).to(device)
                g = torch.Generator(device=device).manual_seed(0)
                hidden = torch.randn(tokens, 1, sz["hidden"], generator=g, device=device).to(dtype)
                hidden[real:] = hidden[real]
                dh = torch.randn(tokens, 1, sz["hidden"], generator=g, device=device).to(dtype)
                dh[real:] = 0
                ids = torch.zeros(1, tokens, dtype=torch.int64, device=device)
                ids[:, real:] = -1
                docs = PackedSeqDocuments(qkv_format="sbhd", documents=ids, num_documents=2)
                hi = hidden.clone().requires_grad_()

                def step(d):
                    layer.router.documents = d   # as its layer sets it for the call (models/lm.py)
                    try:
                        y, _ = layer(hi)
                    finally:
                        layer.router.documents = None
                    y.backward(dh)
                    return y

                row = {"tokens": tokens, "padding_fraction": fraction, "padding_tokens": tokens - real}
                got = {}
                for name, d in (("routed", None), ("dropped", docs)):
                    row[f"{name}_ms"] = timed(lambda d=d: step(d), reps=reps)
                    row[f"{name}_peak_gb"] = peak_gb(lambda d=d: step(d))
                    hi.grad = None
                    y = step(d)
                    got[name] = (y.detach()[:real].float(), hi.grad[:real].float())
                    hi.grad = None
                    layer.zero_grad(set_to_none=True)
                row["dropped_over_routed"] = row["dropped_ms"] / row["routed_ms"]
                row["docs_out_rel_diff"] = rel(got["routed"][0], got["dropped"][0])
                row["docs_dinput_rel_diff"] = rel(got["routed"][1], got["dropped"][1])
                out[key] = row
                layer = None
            except Exception as e:  # noqa: BLE001
                record_failure(out, key, e)


# ------------------------------------------------------------------------------------------ loss timing
def bench_ce(device, dtype, sz, out) -> None:
    from models.moe.chunked_ce import chunked_cross_entropy

    reps = 3 if GPU else 1
    weight = (torch.randn(sz["vocab"], sz["hidden"], device=device) * sz["hidden"] ** -0.5).to(dtype).requires_grad_()
    for tokens in sz["tokens"]:
        hidden = torch.randn(tokens, 1, sz["hidden"], device=device, dtype=dtype).requires_grad_()
        labels = torch.randint(0, sz["vocab"], (tokens, 1), device=device)
        cases = {"megatron_full_logits": lambda: megatron_loss(hidden, weight, labels)}
        for c in sz["chunks"]:
            cases[f"chunked_{c}"] = (lambda c=c: chunked_cross_entropy(hidden, weight, labels, chunk_tokens=c))
        for name, loss_fn in cases.items():
            key = f"ce/{tokens}/{name}"
            try:
                def fwd_bwd():
                    loss_fn().sum().backward()
                    hidden.grad = weight.grad = None

                ms = timed(fwd_bwd, reps=reps)
                out[key] = {"tokens": tokens, "impl": name, "fwd_bwd_ms": ms, "peak_gb": peak_gb(fwd_bwd)}
            except Exception as e:  # noqa: BLE001
                record_failure(out, key, e)
        hidden = labels = None


# ----------------------------------------------------------------------------------------------- report
def print_table(res: dict) -> None:
    print("\nchecks (relative RMSE vs SequentialMLP / megatron loss; bf16 bound 2e-2):")
    for k, v in res["checks"].items():
        print(f"  {k}: " + ", ".join(f"{a}={b:.2e}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items()
                                      if a != "traceback"))
    print(f"\n{'case':<40}{'fwd ms':>10}{'fwd+bwd ms':>12}{'TFLOP/s':>10}{'peak GB':>10}")
    for k, v in res["timings"].items():
        if "error" in v:
            print(f"{k:<40}  FAILED: {v['error'][:80]}")
            continue
        if k.startswith("padding/"):
            print(f"{k:<40}  fwd+bwd {v['routed_ms']:.2f} ms padding routed, {v['dropped_ms']:.2f} ms dropped "
                  f"({v['dropped_over_routed']:.3f}); documents' output / d_input differ by "
                  f"{v['docs_out_rel_diff']:.1e} / {v['docs_dinput_rel_diff']:.1e}")
            continue
        tf = v.get("fwd_bwd_tflops", v.get("expert_tflops"))
        pk = v.get("peak_gb")
        print(f"{k:<40}{v.get('fwd_ms', float('nan')):>10.2f}{v['fwd_bwd_ms']:>12.2f}"
              f"{(tf if tf is not None else float('nan')):>10.1f}{(pk if pk is not None else float('nan')):>10.2f}")


def run_checks_isolated(args) -> dict:
    """The checks run in a child process: a device-side assert in torch._grouped_mm (e.g. on an empty group)
    poisons the CUDA context, and must not cost the timings."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "checks.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--section", "checks", "--out", out]
        if args.smoke:
            cmd.append("--smoke")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        got = {}
        if os.path.exists(out):
            with open(out) as f:
                got = json.load(f)["checks"]
        if proc.returncode != 0:  # what the child wrote before it died, plus why it died
            got["checks_process"] = {"error": f"exit code {proc.returncode}", "traceback": proc.stderr[-3000:]}
        return got


def main() -> None:
    ap = argparse.ArgumentParser(description="MoE experts and LM-loss benchmark (one GPU; --smoke on CPU)")
    ap.add_argument("--out", default="moe.json")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, fp32 on CPU: checks that everything runs")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default 8192,32768)")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {IMPLS}")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: checks,moe,padding,ce")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section only
    args = ap.parse_args()
    if not GPU and not args.smoke:
        raise SystemExit("no GPU: run with --smoke")
    dtype = torch.bfloat16 if GPU else torch.float32
    sz = lm_sizes(args.smoke)
    if args.tokens:
        sz["tokens"] = [int(t) for t in args.tokens.split(",")]
    impls = [i for i in args.impls.split(",") if i]
    skip = set(args.skip.split(","))
    t0 = time.time()
    checks_result = None
    if args.section is None and "checks" not in skip:
        checks_result = run_checks_isolated(args)
    device, pgs = setup_megatron()
    import triton

    from models.moe import grouped_gemm

    res = {"env": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                   "device": torch.cuda.get_device_name() if GPU else "cpu", "dtype": str(dtype),
                   "has_torch_grouped_mm": grouped_gemm.has_torch_grouped_mm(), "sizes": sz, "smoke": args.smoke,
                   "command": " ".join(sys.argv)},
           "checks": checks_result or {}, "timings": {}}

    def dump():
        res["env"]["wall_s"] = time.time() - t0
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    if args.section == "checks":
        checks(pgs, device, dtype, args.smoke, res["checks"], dump)
    else:
        dump()
        if "moe" not in skip:
            bench_moe(pgs, device, dtype, sz, impls, res["timings"])
            dump()
        if "padding" not in skip:
            bench_padding(pgs, device, dtype, sz, res["timings"])
            dump()
        if "ce" not in skip:
            bench_ce(device, dtype, sz, res["timings"])
            dump()
        print_table(res)
        print(f"\nwrote {args.out} ({res['env']['wall_s']:.0f} s)")
    from parallel.groups import teardown

    teardown()


if __name__ == "__main__":
    main()
