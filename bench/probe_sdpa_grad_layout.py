"""GPU probe: is SDPA's backward right when one shape meets two layouts of its output gradient?

    python bench/probe_sdpa_grad_layout.py

For each backend (default, cuDNN, flash, memory-efficient) and order, one shape of its own ([1, 32 q / 4 kv
heads, n, 128], bf16, causal, GQA) runs two backwards: the output gradient first a slice of a row twice as
long, then contiguous (or the other order). Prints dq's relative RMSE against float64 for each. On the H200
with torch 2.11 the second backward was wrong on the default (cuDNN) backend and right on flash
(bench/RESULTS.md); models/sdpa.py is the project's guard."""
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def rel(a, b):
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()


def case(backend, first, second, n=2048, hq=32, hkv=4, d=128):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h, m=n: torch.randn(1, h, m, d, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    q, k, v = mk(hq), mk(hkv), mk(hkv)
    row = mk(hq, 2 * n)  # the output gradient as a slice of a row twice as long
    do = {"strided": row[:, :, :n], "contiguous": row[:, :, :n].contiguous()}
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True).backward(row[:, :, :n].double())
    out = []
    ctx = sdpa_kernel([backend]) if backend is not None else torch.enable_grad()
    with ctx:
        for layout in (first, second):
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True).backward(do[layout])
            out.append(rel(qq.grad, qr.grad))
    return out


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.cli import parser, require_gpus  # noqa: E402

parser(__doc__).parse_args()
require_gpus(__file__)
for name, backend in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                      ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
    for first, second in (("strided", "contiguous"), ("contiguous", "strided")):
        try:
            a, b = case(backend, first, second, n=1024 + 64 * len(name) + (8 if first == "strided" else 0))
            print(f"{name:9s} {first:10s} then {second:10s}: dq rel {a:.2e} then {b:.2e}", flush=True)
        except Exception as e:
            print(f"{name:9s}: {type(e).__name__}: {str(e)[:120]}", flush=True)
