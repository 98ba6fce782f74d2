"""train.deterministic: training steps that are bitwise reproducible on a GPU, run to run and across a stop / resume.

Off by default (every run as before). On, `apply_deterministic` sets, before CUDA is first used (train/launch.run
calls it right after the config is read, Trainer again for code that builds one directly):

- `torch.use_deterministic_algorithms(True)`, strict (warn_only=False): torch then takes its deterministic kernels
  (index_add_, scatter_add_, index_put_(accumulate=True), the backward of index_select / gather / embedding lookups),
  and an op that has none raises at its first call, naming it: a run that says it is reproducible and is not would be
  worse than one that stops. SDPA (the ViT's attention, the LM's dense attention) needs strict too: only then is
  flash's backward run deterministically, the memory-efficient backward with one key split, and cuDNN attention
  (nondeterministic backward; torch 2.11's pick for bf16 at head dim 128 on an H200, models/sdpa.py) never chosen;
  under warn_only all three stay nondeterministic with a warning. torch also fills fresh `torch.empty` memory.
- `CUBLAS_WORKSPACE_CONFIG=:4096:8` (cuBLAS picks its split of a GEMM by the workspace it has; torch refuses a cuBLAS
  call in this mode without it). A value set already must be one of cuBLAS's two deterministic ones.
- cuDNN: `deterministic=True`, `benchmark=False` (no timing-dependent choice of algorithm).
- `NCCL_ALGO=Ring` unless set already to Ring or Tree (as Megatron-LM asks in its deterministic mode): NCCL otherwise
  chooses its reduction algorithm per message size and topology, NVLS / CollNet among them, whose sums need not come
  out in one order.
- megatron's `TransformerConfig.deterministic_mode` (models/lm.transformer_config): its vocabulary embedding looks
  rows up by indexing, whose backward torch makes deterministic; its MoE permutation already follows torch's switch.

Our own ops follow torch's switch as torch's and megatron's MoE do (`torch.are_deterministic_algorithms_enabled()`,
no state of ours): the ViT's position table resized per frame size (models/vision/vit.py, whose bilinear
interpolate has no deterministic CUDA backward), and DSA's Triton sparse-stage backward (kernels/dsa), which then
adds its dK / dV, the KL's head-summed P and dk_idx as int64 fixed-point values with integer atomics (exact sums,
whatever their order) instead of fp32 atomics (kernels/dsa/README.md, "Deterministic backward";
bench/bench_dsa_deterministic.py times it). What cannot be deterministic stops the run before it
starts (`check_deterministic`: the environment's cuBLAS and NCCL settings).
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

CUBLAS_WORKSPACE = ":4096:8"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")   # the two settings cuBLAS documents as reproducible
NCCL_DETERMINISTIC = ("Ring", "Tree")


def check_deterministic(cfg, *, cuda: bool, environ: MutableMapping[str, str] | None = None) -> None:
    """With train.deterministic=true: the settings and environment can give a reproducible run (ValueError naming
    them). Nothing to check when it is off."""
    if not cfg.train.deterministic:
        return
    env = os.environ if environ is None else environ
    cublas = env.get("CUBLAS_WORKSPACE_CONFIG")
    if cublas is not None and cublas not in CUBLAS_DETERMINISTIC:
        raise ValueError(f"train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG to be one of {CUBLAS_DETERMINISTIC} "
                         f"(unset: {CUBLAS_WORKSPACE} is set), got {cublas!r} in the environment")
    algo = env.get("NCCL_ALGO")
    if algo is not None and algo not in NCCL_DETERMINISTIC:
        raise ValueError(f"train.deterministic=true needs NCCL_ALGO to be one of {NCCL_DETERMINISTIC} (unset: Ring is "
                         f"set), got {algo!r} in the environment: other algorithms need not sum in one order")


def apply_deterministic(enabled: bool, *, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Turns the mode on (module docstring) when `enabled`; returns what it set, for the log. Off: touches nothing
    (a run as before). Call it before CUDA is first used: cuBLAS reads its workspace setting once."""
    if not enabled:
        return []
    env = os.environ if environ is None else environ
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    env.setdefault("NCCL_ALGO", "Ring")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return ["torch.use_deterministic_algorithms(True)", f"CUBLAS_WORKSPACE_CONFIG={env['CUBLAS_WORKSPACE_CONFIG']}",
            f"NCCL_ALGO={env['NCCL_ALGO']}", "cudnn.deterministic", "megatron deterministic_mode"]
