"""GPU: DSA's sparse-stage Triton backward with fp32 atomics against its deterministic variant, in the same run.

    python bench/bench_dsa_deterministic.py --out $OUT/dsa_det.json                    # L = 8K, 32K, 128K

Shapes and inputs are bench_dsa.py's: B = 1, 32 query / 4 KV heads, head dim 128, indexer 16 x 64, top-k 2048,
bf16, smooth indexer inputs. Per L, the sparse stage as the model's DSA layer runs it (top-k, union plan, the
attention with the KL's target summed in its backward: kernels/dsa/fused.py) with torch's deterministic algorithms
off (the backward adds dK / dV, P over the KV groups and dk_idx with fp32 atomics) and on (what train.deterministic
sets: the deterministic backward's int64 fixed-point sums, kernels/dsa/README.md "Deterministic backward"):
- fwd_bwd_ms: forward + backward, median of triton's do_bench; peak_gib: the peak memory allocated during one;
- bwd_ms / bwd_extra_gib: the backward alone (fused.attention_kl_bwd on one plan) and the memory it adds;
- bitwise_repeat: per output (dq, dk, dv, dq_idx, dw, dk_idx, kl), whether two backward passes on the same inputs
  gave the same bits (the deterministic path must; the atomics path need not).
A case that fails (out of memory, ...) is recorded in the JSON and the run goes on. Prints a table last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cli import require_gpus  # noqa: E402

LENGTHS = (8192, 32768, 131072)
OUTPUTS = ("dq", "dk", "dv", "dq_idx", "dw", "dk_idx", "kl")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} must be >= 1")
    return n


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", type=positive_int, nargs="+", default=list(LENGTHS), help="sequence lengths (tokens)")
    ap.add_argument("--quick", action="store_true", help="fewer timing repeats")
    ap.add_argument("--out", default="dsa_deterministic.json")
    return ap.parse_args(argv)


@contextlib.contextmanager
def torch_deterministic(on: bool):
    """torch's deterministic algorithms on or off (the switch the kernels follow), restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def stage_fwd_bwd(x: dict, topk: int, block_q: int, chunk_bytes: int | None = None):
    """The sparse stage as the model's layer runs it (dsa_attention(kl_in_backward=1)), forward and backward: the
    gradients of q, k, v, q_idx, w, k_idx for the output gradient x["do"], and the KL the backward filled."""
    from kernels.dsa import build_sparse_plan, dsa_topk
    from kernels.dsa.fused import SparseAttentionKLFn

    names = ("q", "k", "v", "q_idx", "w", "k_idx")
    idx = dsa_topk(x["q_idx"], x["w"], x["k_idx"], topk)
    plan = build_sparse_plan(idx, block_q)
    kl = torch.full((), float("nan"), device=x["q"].device)
    o = SparseAttentionKLFn.apply(*(x[n] for n in names), plan, x["q"].shape[-1] ** -0.5, 1.0, kl, chunk_bytes)
    return (*torch.autograd.grad(o, [x[n] for n in names], x["do"]), kl)


def backward_inputs(x: dict, topk: int, block_q: int) -> dict:
    """What fused.attention_kl_bwd reads: the forward's o and lse, the plan, the output gradient."""
    from kernels.dsa import build_sparse_plan, dsa_topk
    from kernels.dsa.sparse_attn import sparse_attn_fwd

    with torch.no_grad():
        idx = dsa_topk(x["q_idx"], x["w"], x["k_idx"], topk)
        plan = build_sparse_plan(idx, block_q)
        q, k, v = (x[n].detach().contiguous() for n in ("q", "k", "v"))
        scale = q.shape[-1] ** -0.5
        o, lse = sparse_attn_fwd(q, k, v, plan, scale)
    n = q.shape[0] * q.shape[1]
    return dict(q=q, k=k, v=v, o=o, do=x["do"].contiguous(), lse=lse,
                q_idx=x["q_idx"].detach().contiguous(), w=x["w"].detach().contiguous(),
                k_idx=x["k_idx"].detach().contiguous(), plan=plan, scale=scale,
                gscale=torch.full((1,), 1.0 / n, dtype=torch.float32, device=q.device))


def backward(b: dict, chunk_bytes: int | None = None):
    """fused.attention_kl_bwd alone: (dq, dk, dv, dq_idx, dw, dk_idx, per-token kl)."""
    from kernels.dsa.fused import attention_kl_bwd

    return attention_kl_bwd(b["q"], b["k"], b["v"], b["o"], b["do"], b["lse"], b["q_idx"], b["w"], b["k_idx"],
                            b["plan"], b["scale"], b["gscale"], chunk_bytes=chunk_bytes)


def bitwise_repeat(first, second) -> dict[str, bool]:
    """Per output: whether two passes gave the same bits."""
    return {n: bool(torch.equal(a, b)) for n, a, b in zip(OUTPUTS, first, second)}


def run_case(x: dict, *, deterministic: bool, quick: bool) -> dict:
    from bench.bench_dsa import TOPK, peak_mem, timed
    from kernels.dsa import default_block_q

    block_q = default_block_q(x["q"].shape[2], x["k"].shape[2])
    row = {}
    with torch_deterministic(deterministic):
        row["fwd_bwd_ms"] = timed(lambda: stage_fwd_bwd(x, TOPK, block_q), quick)
        row["peak_gib"] = peak_mem(lambda: stage_fwd_bwd(x, TOPK, block_q))[0] / 2**30
        b = backward_inputs(x, TOPK, block_q)
        row["bwd_ms"] = timed(lambda: backward(b), quick)
        row["bwd_extra_gib"] = peak_mem(lambda: backward(b))[1] / 2**30
        first = backward(b)
        second = backward(b)
        row["bitwise_repeat"] = bitwise_repeat(first, second)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"{'L':>7} {'path':>14} {'fwd+bwd ms':>11} {'bwd ms':>8} {'peak GiB':>9} "
          f"{'bwd +GiB':>9}  bit-identical twice")
    for r in rows:
        for path, res in r["paths"].items():
            if "error" in res:
                print(f"{r['L']:>7} {path:>14}  {res['error'][:80]}")
                continue
            same = [n for n, ok in res["bitwise_repeat"].items() if ok]
            print(f"{r['L']:>7} {path:>14} {res['fwd_bwd_ms']:>11.2f} "
                  f"{res['bwd_ms']:>8.2f} {res['peak_gib']:>9.2f} {res['bwd_extra_gib']:>9.2f}  "
                  f"{'all' if len(same) == len(OUTPUTS) else ','.join(same) or 'none'}")


def main(argv=None) -> None:
    args = parse_args(argv)
    require_gpus(__file__)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # as train.deterministic sets it, before CUDA
    import triton

    from bench.bench_dsa import make_inputs

    rows = []
    for L in args.L:
        row = {"L": L, "paths": {}}
        try:
            x = make_inputs(L)
        except Exception as e:   # recorded, the run goes on
            row["paths"]["inputs"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            continue
        for name, det in (("atomics", False), ("deterministic", True)):
            try:
                res = run_case(x, deterministic=det, quick=args.quick)
                if det:
                    base = row["paths"].get("atomics", {})
                    if "fwd_bwd_ms" in base:
                        res["fwd_bwd_x_atomics"] = res["fwd_bwd_ms"] / base["fwd_bwd_ms"]
                        res["bwd_x_atomics"] = res["bwd_ms"] / base["bwd_ms"]
            except Exception as e:   # recorded, the run goes on
                res = {"error": f"{type(e).__name__}: {str(e)[:300]}", "traceback": traceback.format_exc()[-2000:]}
                torch.cuda.empty_cache()
            row["paths"][name] = res
        rows.append(row)
        del x
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "command": " ".join(sys.argv), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
