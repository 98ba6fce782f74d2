"""ViT + projector, and the per-frame cost model the ViT layout balances with.

`VisionModel.forward(pixel_values [P, C*p*p], grid_thw [F, 3]) -> [P / merge**2, lm_hidden]`, merged
tokens in ViT-output order: frame by frame, merge row, merge col; this is the order of
`PackedSample.visual_pos`, so row i goes to sequence position visual_pos[i].
"""

from __future__ import annotations

import torch
from torch import nn

from models.vision.config import VisionConfig
from models.vision.projector import PatchMerger
from models.vision.vit import SiglipViT


def frame_flops(cfg: VisionConfig, rows: int | torch.Tensor, cols: int | torch.Tensor):
    """Forward FLOPs of encoding one frame of rows x cols patches (n = rows * cols), multiply-add = 2:

        patch embed   2 n (C p^2) h
        per layer     2 n (4 h^2 + 2 h mlp)      qkv + output projection + MLP   (linear in n)
                    + 4 n^2 h                    Q K^T and P V over the frame    (quadratic in n)
        projector     2 (n / m^2) ((m^2 h)^2 + m^2 h lm_hidden)

    Elementwise work (norms, RoPE, softmax) is left out: it is O(n h), small next to the GEMMs. The
    quadratic term is what makes a 1024-patch frame cost more than four 256-patch frames, which is
    why the layout balances by this cost and not by patch count. Works on ints or tensors."""
    n = rows * cols
    h, m2 = cfg.hidden, cfg.merge_tokens
    per_layer = 2 * n * (4 * h * h + 2 * h * cfg.mlp) + 4 * n * n * h
    proj = 2 * (n // m2) * ((m2 * h) ** 2 + m2 * h * cfg.lm_hidden)
    return 2 * n * cfg.patch_dim * h + cfg.depth * per_layer + proj


class VisionModel(nn.Module):
    """SigLIP ViT + 2x2 patch merger. `recompute` checkpoints each ViT block. A frozen ViT (no
    parameter requiring grad) runs without storing activations; the projector may still train."""

    def __init__(self, cfg: VisionConfig, *, recompute: bool = False):
        super().__init__()
        self.cfg = cfg
        self.vit = SiglipViT(cfg, recompute=recompute)
        self.projector = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.vit(pixel_values, grid_thw)
        if not any(p.requires_grad for p in self.projector.parameters()) and torch.is_grad_enabled():
            with torch.no_grad():
                return self.projector(x)
        return self.projector(x)

    def frame_cost(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """[F] float64 forward FLOPs per frame (see `frame_flops`); the balancing weight of a frame."""
        g = grid_thw.to(torch.float64)
        return frame_flops(self.cfg, g[:, 1], g[:, 2]).reshape(-1)
