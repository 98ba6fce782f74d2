"""Test-wide settings: Triton kernels run under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any module that defines a `@triton.jit` kernel is imported,
because triton decides between compiled and interpreted functions at decoration time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
