"""Compile every DSA kernel for an NVIDIA target without a GPU and report registers, spills, smem.

    python -m kernels.dsa.aot_check                 # sm_90 (H100 / H200), the benchmark shapes
    python -m kernels.dsa.aot_check --arch 100      # another compute capability
    python -m kernels.dsa.aot_check --only dense_kl # the kernels whose name holds "dense_kl"

Uses Triton's bundled ptxas, so it runs on a CPU-only machine (do not set TRITON_INTERPRET). The
tile sizes are the ones the wrappers pick on a CUDA device. STACK > 0 means register spills; SMEM
must stay under the 227 KB an H100 / H200 block may use. Shapes: Hq 32, Hkv 4, D 128, HI 16,
DI 64, top-k 2048, bf16.
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

from . import indexer_loss as il
from . import indexer_loss_dense as ild
from . import sparse_attn as sa
from . import topk as tk
from . import plan as pl
from .common import pow2

CUDA = torch.device("cuda")


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


# integer arguments the wrappers keep multiples of 16 and Triton specialises on that (not in the
# kernel's do_not_specialize): the top-k score slab's row stride W, the candidate capacity CAP
DIV16 = ("W", "CAP")


def compile_one(fn, sig: dict, consts: dict, num_warps: int, num_stages: int, arch: int,
                maxnreg: int | None = None) -> dict:
    full = dict(sig)
    full.update({k: "constexpr" for k in consts})
    t0 = time.time()
    # As at launch: pointers are specialized as 16-byte aligned (torch allocations are), which
    # lets loads vectorize and the pipeliner stage them in shared memory; without it the report
    # understated shared memory (a top-k kernel read 32 KB here and needed 464 KB on the H200).
    names = fn.arg_names
    fixed = {names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items()
             if v.startswith("*") or (k in DIV16 and k not in fixed)}
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    ck = triton.compile(ASTSource(fn=fn, signature=full, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", arch, 64), options=options)
    return dict(kernel=fn.__name__, warps=num_warps, stages=num_stages, maxnreg=maxnreg,
                smem=ck.metadata.shared, res=_resources(ck.asm["cubin"]),
                seconds=round(time.time() - t0, 1))


def specs(dt: str = "*bf16", HQ=32, HKV=4, D=128, HI=16, DI=64, K=2048):
    G = HQ // HKV
    GP, DP, HIP, DIP = pow2(G), pow2(D, 16), pow2(HI), pow2(DI, 16)
    prec = "tf32"
    out = []
    c = tk._config(CUDA)
    cap = tk.default_cap(K)
    M = min(2048, cap // 2)
    out.append((tk.topk_fwd_kernel_sample,
                dict(q_idx=dt, w=dt, k_idx=dt, start_ptr="*i32", blk_ptr="*i32",
                     scratch_ptr="*fp32", T="i32", NBT="i32", CAP="i32", M="i32"),
                dict(HI=HI, DI=DI, DIP=DIP, BT=c["BT"], SB=c["SB"], MP=pow2(M), DOT_PREC=prec),
                c["warps_sample"], 2))
    out.append((tk.topk_fwd_kernel_tau,
                dict(start_ptr="*i32", blk_ptr="*i32", tau_ptr="*fp32", scratch_ptr="*fp32",
                     NSLOT="i32", T="i32", NBT="i32", K="i32", CAP="i32", M="i32", TARGET="i32"),
                dict(BT=c["BT"], MP=pow2(M), R=c["R"]), c["warps_select"], 2))
    out.append((tk.topk_fwd_kernel_filter,
                dict(q_idx=dt, w=dt, k_idx=dt, start_ptr="*i32", blk_ptr="*i32", tau_ptr="*fp32",
                     cnt_ptr="*i32", cand_s_ptr="*fp32", cand_p_ptr="*i32", T="i32", NBT="i32",
                     CAP="i32"),
                dict(HI=HI, DI=DI, DIP=DIP, BT=c["BT"], BS=c["BS"], DOT_PREC=prec),
                c["warps_filter"], 2))
    out.append((tk.topk_fwd_kernel_score,
                dict(q_idx=dt, w=dt, k_idx=dt, start_ptr="*i32", blk_ptr="*i32", buf_ptr="*fp32",
                     NSLOT="i32", T="i32", NBT="i32", K="i32", NROW="i32", W="i32"),
                dict(HI=HI, DI=DI, DIP=DIP, BT=c["BT"], RS=c["RS"], BN=c["BN"], KS=c["KS"], STORE=c["store"],
                     DOT_PREC=prec), c["warps_score"], c["stages_score"]))
    out.append((tk.topk_fwd_kernel_compact,
                dict(start_ptr="*i32", blk_ptr="*i32", buf_ptr="*fp32", cnt_ptr="*i32",
                     cand_s_ptr="*fp32", cand_p_ptr="*i32", NSLOT="i32", T="i32", NBT="i32",
                     K="i32", CAP="i32", M="i32", TARGET="i32", W="i32"),
                dict(BT=c["BT"], MP=pow2(M), BC=c["BC"], STORE=c["asm_stores"],
                     PF=c["prefetch"]), c["warps_compact"], 2))
    out.append((tk.topk_fwd_kernel_select,
                dict(start_ptr="*i32", blk_ptr="*i32", cnt_ptr="*i32", cand_s_ptr="*fp32",
                     cand_p_ptr="*i32", out_ptr="*i32", fail_ptr="*i32", NSLOT="i32", T="i32",
                     NBT="i32", K="i32", CAP="i32"),
                dict(BT=c["BT"], R=c["R"], RB=pow2(cap), OB=min(pow2(K), 1024),
                     STORE=c["asm_stores"], SUB=c["select_sub"]), c["warps_select"], 2))
    out.append((tk.topk_fwd_kernel_select_long,
                dict(start_ptr="*i32", blk_ptr="*i32", cnt_ptr="*i32", cand_s_ptr="*fp32",
                     cand_p_ptr="*i32", out_ptr="*i32", T="i32", NBT="i32", K="i32", CAP="i32"),
                dict(BT=c["BT"], RB=1024), c["warps_select"], 2))
    BQ = pl.default_block_q(HQ, HKV)
    out.append((pl.plan_fwd_kernel_union,
                dict(idx_ptr="*i32", counts_ptr="*i32", offsets_ptr="*i64", pos_ptr="*i32",
                     bits_ptr="*i32", T="i32", NBT="i32", K="i32", WRITE="i32", PID0="i32",
                     CAPB="i32"),
                dict(BQ=BQ, KP=pow2(K), MERGE=True, LOG_KP=pow2(K).bit_length() - 1,
                     LOG_N=(BQ * pow2(K)).bit_length() - 1), 4, 2))
    pc = pl._config()
    out.append((pl.plan_fwd_kernel_mark,
                dict(idx_ptr="*i32", bm_ptr="*i32", hi_ptr="*i32", T="i32", NBT="i32", K="i32", PID0="i32",
                     WORDS="i32", NKEYS="i32", NB="i32"), dict(BQ=BQ, KB=min(pc["KB"], pow2(K))),
                pc["warps_mark"], 2))
    out.append((pl.plan_fwd_kernel_emit,
                dict(bm_ptr="*i32", idx_ptr="*i32", hi_ptr="*i32", counts_ptr="*i32", pos_ptr="*i32",
                     bits_ptr="*i32", T="i32", NBT="i32", K="i32", PID0="i32", WORDS="i32",
                     CAPB="i32"), dict(BQ=BQ, NW=max(1, pc["bits_emit"] // (32 * BQ))),
                pc["warps_emit"], 2))
    out.append((pl.plan_fwd_kernel_compact,
                dict(pad_pos="*i32", pad_bits="*i32", offsets_ptr="*i64", pos_ptr="*i32",
                     bits_ptr="*i32", CAPB="i32", BASE="i64"), dict(BLOCK=1024), 4, 2))
    c = sa._config(CUDA, BQ * GP, D)
    heads = dict(HQ=HQ, HKV=HKV, G=G, GP=GP, D=D, DP=DP, BQ=BQ, DOT_PREC=prec)
    plan_sig = dict(offsets="*i64", upos="*i32", ubits="*i32", T="i32", NBT="i32")
    out.append((sa.sparse_attn_fwd_kernel_union,
                dict(q=dt, k=dt, v=dt, o=dt, lse="*fp32", **plan_sig, scale_log2="fp32"),
                dict(heads, BS=c["BS_fwd"]), c["warps_fwd"], c["stages_fwd"]))
    for T, psum, det in ((131072, False, False), (65536, False, False), (131072, True, False), (65536, True, False),
                         (131072, True, True)):
        # uncapped registers above 64K-token documents, capped up to it; with the KL's target (fused.py) or not;
        # det: the deterministic backward's int64 fixed-point sums (integer atomics) instead of fp32 atomics
        c = sa._config(CUDA, BQ * GP, D, span=T)
        acc = "*i64" if det else "*fp32"
        out.append((sa.sparse_attn_bwd_kernel_union,
                    dict(q=dt, k=dt, v=dt, o=dt, do=dt, lse="*fp32", dq=dt, dk=acc,
                         dv=acc, offsets="*i64", upos="*i32", ubits="*i32", psum=acc, fix="*fp32",
                         T="i32", NBT="i32", PID0="i32", U0="i64", scale="fp32"),
                    dict(heads, BS=c["BS_bwd"], PSUM=psum, DET=det), c["warps_bwd"], c["stages_bwd"],
                    c["maxnreg_bwd"]))
    c = il._config(CUDA)
    common = dict(q=dt, k=dt, lse="*fp32", q_idx=dt, w=dt, k_idx=dt, offsets="*i64", upos="*i32",
                  ubits="*i32")
    meta = dict(HQ=HQ, HKV=HKV, G=G, GP=GP, D=D, DP=DP, HI=HI, HIP=HIP, DI=DI, DIP=DIP, BQ=BQ,
                DOT_PREC=prec)
    split = c["split_fwd"]
    if split:
        out.append((il.indexer_loss_fwd_kernel_psum,
                    dict(q=dt, k=dt, lse="*fp32", offsets="*i64", upos="*i32", ubits="*i32",
                         psum_ptr="*fp32", T="i32", NBT="i32", g="i32", PID0="i32", U0="i64",
                         scale_log2="fp32"),
                    dict(heads, BS=c["BS_psum"], FIRST=False), c["warps_psum"], c["stages_split"]))
    out.append((il.indexer_loss_fwd_kernel_kl,
                dict(common, kl_ptr="*fp32", lse_i_ptr="*fp32", z_ptr="*fp32", psum_ptr=dt,
                     psum_in="*fp32", T="i32", NBT="i32", PID0="i32", U0="i64", scale_log2="fp32"),
                dict(meta, BS=c["BS_kl" if split else "BS_fwd"], STORE_P=True, PSUM_IN=split),
                c["warps_kl" if split else "warps"], c["stages_split" if split else "stages"]))
    for det in (False, True):
        out.append((il.indexer_loss_bwd_kernel_kl,
                    dict(common, lse_i_ptr="*fp32", z_ptr="*fp32", psum_ptr=dt, gscale_ptr="*fp32",
                         dq_idx=dt, dw=dt, dk_idx="*i64" if det else "*fp32", fix="*fp32", T="i32", NBT="i32",
                         PID0="i32", U0="i64", scale_log2="fp32"),
                    dict(meta, BS=c["BS_bwd_p"], LOAD_P=True, DET=det), c["warps"], c["stages_bwd_p"]))
    c = ild._config(CUDA)
    out.append((ild.dense_kl_kernel_lse,
                dict(q=dt, k=dt, lse="*fp32", start_ptr="*i32", T="i32", NBT="i32", scale_log2="fp32"),
                dict(HQ=HQ, HKV=HKV, G=G, D=D, DP=DP, BM=c["BM_att"], BN=c["BN_att"], DOT_PREC=prec),
                c["warps_att"], c["stages_att"]))
    dense = dict(q_idx=dt, w=dt, k_idx=dt, start_ptr="*i32")
    chunk = dict(T="i32", R0="i32", NR="i32", W="i32")
    idx_heads = dict(HI=HI, DI=DI, DIP=DIP, DOT_PREC=prec)
    out.append((ild.dense_kl_kernel_lse_i,
                dict(dense, part_ptr="*fp32", T="i32", NBT="i32", NSEG="i32", KS="i32"),
                dict(idx_heads, BM=c["BM_lse"], BN=c["BN_lse"]), c["warps_lse"], c["stages_lse"]))
    out.append((ild.dense_kl_kernel_d,
                dict(q=dt, k=dt, lse="*fp32", **dense, lse_i_ptr="*fp32", d_ptr="*fp32",
                     part_ptr="*fp32", **chunk, NSEG="i32", KS="i32", bb="i32", scale_log2="fp32",
                     inv_z="fp32"),
                dict(idx_heads, HQ=HQ, HKV=HKV, G=G, D=D, DP=DP, BM=c["BM_d"], BN=c["BN_d"], STORE_D=True),
                c["warps_d"], c["stages_d"]))
    for fn, n, grads in ((ild.dense_kl_kernel_dq, "dq", dict(dq_idx=dt, dw=dt)),
                         (ild.dense_kl_kernel_dk, "dk", dict(dk32="*fp32"))):
        out.append((fn, dict(dense, d_ptr="*fp32", gscale_ptr="*fp32", **grads, **chunk, bb="i32"),
                    dict(idx_heads, HIP=HIP, BQ=c["BQ_" + n], BN=c["BN_" + n]), c["warps_" + n],
                    c["stages_" + n]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--only", default="", help="compile only kernels whose name contains this")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles real GPU code")
    for fn, sig, consts, warps, stages, *cap in specs():  # cap: [maxnreg] where set
        if args.only not in fn.__name__:
            continue
        shown = {k: v for k, v in consts.items()
                 if k in ("BQ", "BS", "BT", "R", "RB", "KP", "RS", "BN", "BC", "NW", "KB", "BM")}
        try:
            r = compile_one(fn, sig, consts, warps, stages, args.arch, *cap)
            print(f"{r['kernel']:34s} {str(shown):48s} warps {warps} stages {stages} "
                  f"{'maxnreg ' + str(cap[0]) + ' ' if cap and cap[0] else ''}"
                  f"smem {r['smem']:6d}  {r['res']}  ({r['seconds']}s)", flush=True)
        except Exception as e:  # report and continue with the next kernel
            print(f"{fn.__name__:34s} {str(shown):48s} FAILED: {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200]}", flush=True)


if __name__ == "__main__":
    main()
