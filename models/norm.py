"""RMSNorm for megatron-core specs that also works under sequence parallelism.

megatron-core's torch fallback (`WrappedTorchNorm`) refuses `sequence_parallel=True`, which MoE with
TP needs. Under sequence parallelism each TP rank normalises its own sequence shard with a replicated
weight; its gradient is a partial sum, so the weight is tagged `sequence_parallel` and megatron's
`finalize_model_grads` all-reduces it over the TP group.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 whatever the compute dtype (Qwen3 does the same).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)
