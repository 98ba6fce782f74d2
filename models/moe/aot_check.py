"""Compile the MoE Triton kernels for an NVIDIA target without a GPU; report registers, spills, shared memory.

    python -m models.moe.aot_check              # sm_90 (H100 / H200), bf16, the tiles the wrappers pick on CUDA
    python -m models.moe.aot_check --arch 100

Uses Triton's bundled ptxas, so it runs on a CPU-only machine (do not set TRITON_INTERPRET). STACK > 0 means
register spills; SMEM must stay under the 227 KB an H100 / H200 block may use. Shapes: hidden 2048, expert
FFN 768 (fc1 output 1536).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from models.moe import grouped_gemm as gg
from models.moe import swiglu as sw


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    for line in out.splitlines():
        if "REG:" in line:
            fields = dict(tok.split(":") for tok in line.split() if ":" in tok)
            return f"REG {fields.get('REG')} STACK {fields.get('STACK')}"
    return out.strip()[-200:]


def _fwd_case(k: int, n: int, b_strides: tuple[int, int, int], cfg: dict, dt: str):
    """One grouped_mm_fwd_kernel_rows specialisation: a [T, k] row-major, b[e] (k x n) through b_strides."""
    ints = dict(N=n, stride_am=k, stride_ak=1, stride_be=b_strides[0], stride_bk=b_strides[1], stride_bn=b_strides[2],
                stride_cm=n, stride_cn=1)
    ptrs = dict(a_ptr=dt, b_ptr=dt, c_ptr=dt, tile_expert_ptr="*i32", tile_row_ptr="*i32", ends_ptr="*i32")
    consts = dict(K=k, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PRECISION="tf32")
    return gg.grouped_mm_fwd_kernel_rows, ptrs, ints, consts, cfg["num_warps"], cfg["num_stages"]


def _wgrad_case(m: int, n: int, cfg: dict, dt: str):
    ints = dict(M=m, N=n, stride_at=m, stride_am=1, stride_bt=n, stride_bn=1, stride_ce=m * n, stride_cm=n, stride_cn=1)
    ptrs = dict(a_ptr=dt, b_ptr=dt, c_ptr=dt, ends_ptr="*i32")
    consts = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_T=cfg["BLOCK_K"], PRECISION="tf32",
                  INTERPRET=False)
    return gg.grouped_mm_bwd_kernel_wgrad, ptrs, ints, consts, cfg["num_warps"], cfg["num_stages"]


def specs(hidden: int = 2048, ffn: int = 768, dt: str = "*bf16"):
    """(kernel, pointer args, int args with the values the JIT would see, constexprs, warps, stages)."""
    cfg = gg._tiles(torch.bfloat16)
    h, f2 = hidden, 2 * ffn
    out = [
        _fwd_case(h, f2, (f2 * h, 1, h), cfg, dt),          # fc1 forward: x @ w13[e]^T
        _fwd_case(ffn, h, (h * ffn, 1, ffn), cfg, dt),      # fc2 forward: a @ w2[e]^T
        _fwd_case(h, ffn, (h * ffn, ffn, 1), cfg, dt),      # dA = dY @ w2[e]
        _fwd_case(f2, h, (f2 * h, h, 1), cfg, dt),          # dX = dH @ w13[e]
        _wgrad_case(h, ffn, cfg, dt),                        # dW2[e] = dY_e^T a_e
        _wgrad_case(f2, h, cfg, dt),                         # dW13[e] = dH_e^T x_e
    ]
    bt, bf = sw._blocks(ffn)
    out.append((sw.swiglu_fwd_kernel_probs, dict(h_ptr=dt, p_ptr="*fp32", a_ptr=dt),
                dict(T=100003, stride_h=f2, stride_a=ffn), dict(FF=ffn, HAS_PROBS=True, BLOCK_T=bt, BLOCK_F=bf), 4, 1))
    out.append((sw.swiglu_bwd_kernel_probs, dict(h_ptr=dt, p_ptr="*fp32", da_ptr=dt, a_ptr=dt, dh_ptr=dt, dp_ptr="*fp32"),
                dict(T=100003, stride_h=f2, stride_da=ffn, stride_a=ffn, stride_dh=f2),
                dict(FF=ffn, HAS_PROBS=True, BLOCK_T=bt, BLOCK_F=bf), 4, 1))
    return out


def compile_case(fn, ptrs, ints, consts, warps, stages, arch):
    """Specialises like the JIT does: ints equal to 1 become constants, multiples of 16 and pointers get
    tt.divisibility=16 (tensors from torch's allocator are 16-byte aligned)."""
    sig, attrs, constexprs = {}, {}, dict(consts)
    for name, ty in ptrs.items():
        sig[name] = ty
        attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    for name, value in ints.items():
        if value == 1:
            constexprs[name] = 1
            continue
        sig[name] = "i32"
        if value % 16 == 0:
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    sig.update({k: "constexpr" for k in constexprs})
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", arch, 64), options=dict(num_warps=warps, num_stages=stages))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles real GPU code")
    failed = 0
    for fn, ptrs, ints, consts, warps, stages in specs():
        t0 = time.time()
        shown = {k: v for k, v in {**ints, **consts}.items() if k in ("K", "N", "M", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                                                         "BLOCK_T", "FF")}
        try:
            ck = compile_case(fn, ptrs, ints, consts, warps, stages, args.arch)
            print(f"{fn.__name__:<30} {shown} warps {warps} stages {stages}: SMEM {ck.metadata.shared} "
                  f"{_resources(ck.asm['cubin'])} ({time.time() - t0:.1f} s)")
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"{fn.__name__:<30} {shown}: FAILED {type(e).__name__}: {str(e)[:400]}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
