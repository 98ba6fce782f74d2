"""The DSA kernels run in Triton's interpreter as a user runs them (TRITON_INTERPRET=1, numpy >= 2), without the
interpreter fixes tests/kernels/test_dsa.py applies around its own module.

Before: the first kernel with a runtime loop bound raised `InterpreterError: TypeError('only 0-dimensional arrays can
be converted to Python scalars')`, so `model.lm.dsa.backend=triton` under TRITON_INTERPRET=1 (which the launcher
accepts on CPU) stopped at the first step.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernels.dsa import dsa_attention, dsa_topk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 kernel against naive.py's float64: one fp32 softmax over <= 37 keys per row (observed 4e-7)
TOL = 1e-5


def test_dsa_triton_backend_runs_under_the_interpreter_outside_the_kernel_tests():
    torch.manual_seed(42)
    B, T, Hq, Hkv, D, HI, DI, K = 1, 37, 4, 2, 16, 4, 16, 8
    q, k, v = (torch.randn(B, T, h, D, device=DEV) for h in (Hq, Hkv, Hkv))
    # integer-valued indexer inputs: exact fp32 scores, so the selected sets compare exactly
    q_idx = torch.randint(-2, 3, (B, T, HI, DI), device=DEV).float()
    w = torch.randint(-2, 3, (B, T, HI), device=DEV).float()
    k_idx = torch.randint(-2, 3, (B, T, DI), device=DEV).float()
    idx = dsa_topk(q_idx, w, k_idx, topk=K, backend="triton")
    assert torch.equal(idx, dsa_topk(q_idx, w, k_idx, topk=K, backend="naive"))
    o, loss, _ = dsa_attention(q, k, v, q_idx, w, k_idx, topk=K, backend="triton")
    o_ref, loss_ref, _ = dsa_attention(q, k, v, q_idx, w, k_idx, topk=K, backend="naive")
    assert (o.double() - o_ref.double()).abs().max().item() < TOL
    assert abs(loss.item() - loss_ref.item()) < TOL * max(1.0, abs(loss_ref.item()))
