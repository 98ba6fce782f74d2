"""What the DSA index scores compile to for the GPU (sm_90 PTX, made here by Triton without a GPU).

The interpreter that runs the kernel tests on the CPU computes tl.maximum with numpy, which keeps a NaN; compiled,
tl.maximum(u, 0.0) is PTX max.f32, which returns 0 for a NaN. So the ReLU of the index scores turned a NaN input
into a finite score on the GPU only: bench/bench_topk_nan.py found the top-k selecting otherwise than the
reference (torch.relu keeps the NaN) on an H100, while every interpreted test passed. The scores' ReLU is
kernels/dsa/common.relu_nan; this checks that each function computing index scores (the top-k's, the sparse KL's,
the dense warm-up KL's) compiles it to the NaN-keeping max.NaN.f32, and to no other float max.
"""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import re
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.dsa import indexer_loss as il, indexer_loss_dense as ild, topk as tk


@triton.jit
def topk_scores(q_idx, w, k_idx, out, HI: tl.constexpr, DI: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    row = tl.arange(0, BT).to(tl.int64)
    dd = tl.arange(0, DI)
    kt = tl.load(k_idx + tl.arange(0, BN)[:, None] * DI + dd[None, :])
    sc = tk._index_scores(q_idx, w, row, row < BT, kt, dd, dd < DI, HI, DI, "tf32", False, DI)
    tl.store(out + row[:, None] * BN + tl.arange(0, BN)[None, :], sc)


@triton.jit
def dense_kl_scores(q_idx, w, k_idx, out, HI: tl.constexpr, DI: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    row = tl.arange(0, BT).to(tl.int64)
    dd = tl.arange(0, DI)
    kt = tl.load(k_idx + tl.arange(0, BN)[:, None] * DI + dd[None, :])
    sc = ild._scores(q_idx, w, row, row < BT, kt, dd, dd < DI, HI, DI, "tf32")
    tl.store(out + row[:, None] * BN + tl.arange(0, BN)[None, :], sc)


@triton.jit
def sparse_kl_scores(q_idx, w, k_idx, pos_ptr, out, HI: tl.constexpr, DI: tl.constexpr, BT: tl.constexpr,
                     BN: tl.constexpr):
    r = tl.arange(0, BT * HI)
    dd = tl.arange(0, DI)
    qi = tl.load(q_idx + r[:, None] * DI + dd[None, :])
    wv = tl.load(w + r)
    pos = tl.load(pos_ptr + tl.arange(0, BN))
    u, ki, sc = il._index_tile(qi, wv, k_idx, 0, BN, pos, pos >= 0, DI, DI, BT, HI, "tf32")
    tl.store(out + tl.arange(0, BT)[:, None] * BN + tl.arange(0, BN)[None, :], sc)


for fn in (topk_scores, dense_kl_scores, sparse_kl_scores):
    sig = {a: "*fp32" for a in fn.arg_names if a not in ("HI", "DI", "BT", "BN", "pos_ptr")}
    if "pos_ptr" in fn.arg_names:
        sig["pos_ptr"] = "*i32"
    consts = dict(HI=2, DI=16, BT=16, BN=16)
    sig.update({k: "constexpr" for k in consts})
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 64),
                        options=dict(num_warps=4))
    print(fn.__name__, " ".join(sorted(set(re.findall(r"\bmax(?:\.\w+)*\.f32\b", ck.asm["ptx"])))))
'''


def test_index_scores_keep_a_nan_through_their_relu_when_compiled(tmp_path):
    script = tmp_path / "compile_scores.py"          # a file: @triton.jit reads its functions' source
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # compiled, not interpreted
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert got == {"topk_scores": "max.NaN.f32", "dense_kl_scores": "max.NaN.f32",
                   "sparse_kl_scores": "max.NaN.f32"}, got
