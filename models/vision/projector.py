"""The 2x2 patch merger: ViT patches [P, h] -> LM tokens [P / 4, lm_hidden].

LayerNorm(h) -> each merge group's 4 consecutive patches (merge-group order, see
data.video.packing.patchify) concatenated to [P/4, 4h] -> Linear(4h, 4h) -> GELU -> Linear(4h, lm_hidden).
Because patches arrive in merge-group order the "concatenate" is a free reshape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.vision.config import VisionConfig


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.group = cfg.merge_tokens
        wide = cfg.hidden * self.group
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.projector_norm_eps)
        self.fc1 = nn.Linear(wide, wide)
        self.fc2 = nn.Linear(wide, cfg.lm_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.group:
            raise ValueError(f"patch merger input has {x.shape[0]} patches, not a multiple of merge**2 ({self.group})")
        x = self.norm(x).reshape(x.shape[0] // self.group, self.group * x.shape[1])
        return self.fc2(F.gelu(self.fc1(x)))
