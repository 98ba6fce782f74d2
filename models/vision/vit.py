"""Native-resolution SigLIP ViT: frames of any (rows, cols) grid in one call, without padding.

Legend: P = patches in the call, F = frames, n = rows * cols patches of one frame, h = hidden,
d = head_dim, nf = frames in one size group.

Input: pixel_values [P, C*p*p] (uint8 pixels, or floats already normalised) in the merge-group
order of `data.video.packing.patchify` (frame, merge row, merge col, then the merge x merge patches
of a group, each patch flattened (C, ph, pw)), and grid_thw [F, 3] = (1, rows, cols) in patches.
Output: [P, h] in the same order.

Model: patch embedding (a Linear over the flattened patch), + learned absolute positions (a
pos_grid x pos_grid table bilinearly resized to each frame's grid), pre-LN blocks (LayerNorm ->
attention with qkv bias and 2D RoPE -> residual; LayerNorm -> GELU(tanh) MLP -> residual), post
LayerNorm. Attention never crosses a frame.

Efficiency: token-wise layers (LayerNorm, Linear, MLP) run on all P patches at once. For attention,
frames are grouped by size: the patches are permuted once so that every size group is one
contiguous block [nf * n, ...], which is viewed as a batch [nf, heads, n, d] for one SDPA call per
size (no padding, no per-frame Python loop); the inverse permutation is applied once at the end.
A video's frames all share one size, so a pack usually has a handful of groups. Positions and RoPE
tables are computed once per size and broadcast over the group's frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.sdpa import sdpa
from models.vision.config import VisionConfig


# ---------------------------------------------------------------------------------------------
# inputs and position helpers (shared with nothing else: naive.py has its own transcriptions)
# ---------------------------------------------------------------------------------------------

def validate_inputs(cfg: VisionConfig, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[tuple[int, int]]:
    """Checks the shapes of a call and returns each frame's (rows, cols). ValueError names the input."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [frames, 3] (t, rows, cols), got {tuple(grid_thw.shape)}")
    if grid_thw.dtype.is_floating_point or grid_thw.dtype == torch.bool:
        raise ValueError(f"grid_thw must be an integer tensor, got {grid_thw.dtype}")
    if pixel_values.dim() != 2 or pixel_values.shape[1] != cfg.patch_dim:
        raise ValueError(f"pixel_values must have shape [patches, {cfg.patch_dim}] (in_channels * patch * patch = "
                         f"{cfg.in_channels} * {cfg.patch} * {cfg.patch}), got {tuple(pixel_values.shape)}")
    grid = grid_thw.tolist()
    sizes: list[tuple[int, int]] = []
    for i, (t, r, c) in enumerate(grid):
        if t != 1:
            raise ValueError(f"grid_thw[{i}] = {(t, r, c)}: t must be 1 (temporal patch 1: one grid row per frame)")
        if r < 1 or c < 1 or r % cfg.merge or c % cfg.merge:
            raise ValueError(f"grid_thw[{i}] = {(t, r, c)}: rows and cols must be positive multiples of "
                             f"merge ({cfg.merge})")
        sizes.append((r, c))
    total = sum(r * c for r, c in sizes)
    if total != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes {total} "
                         f"(sum of rows * cols over {len(sizes)} frames)")
    return sizes


def normalize_pixels(cfg: VisionConfig, pixel_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 -> ((x / 255) - mean) / std per channel in `dtype`; floating input is taken as already
    normalised (what HF image processors emit) and only cast. Channel of column j is j // (p * p)."""
    if pixel_values.dtype.is_floating_point:
        return pixel_values.to(dtype)
    if pixel_values.dtype != torch.uint8:
        raise ValueError(f"pixel_values must be uint8 (raw pixels) or floating (normalised), got {pixel_values.dtype}")
    pp = cfg.patch * cfg.patch
    dev = pixel_values.device
    mean = torch.tensor(cfg.pixel_mean, dtype=dtype, device=dev).repeat_interleave(pp)
    inv_std = 1.0 / torch.tensor(cfg.pixel_std, dtype=dtype, device=dev).repeat_interleave(pp)
    return (pixel_values.to(dtype) / 255.0 - mean) * inv_std


def merge_order_index(rows: int, cols: int, merge: int, device=None) -> torch.Tensor:
    """[rows*cols] row-major patch index of each slot in merge-group order.

    Slot k of a frame holds patch (row, col) = divmod(index[k], cols): the merge-group order is
    (merge row, merge col, row in group, col in group), i.e. a [rows/m, m, cols/m, m] grid viewed
    with its axes permuted to (0, 2, 1, 3)."""
    idx = torch.arange(rows * cols, device=device).view(rows // merge, merge, cols // merge, merge)
    return idx.permute(0, 2, 1, 3).reshape(-1)


def bilinear_matrix(out: int, size: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """[out, size]: row i holds the weights of F.interpolate's linear resize (align_corners=False, no antialias)
    of a length-`size` axis to `out` samples: source x = (i + 0.5) * size / out - 0.5, clamped at 0, shared by
    floor(x) and floor(x) + 1 (the last index clamped) as 1 - frac and frac."""
    x = ((torch.arange(out, dtype=torch.float64, device=device) + 0.5) * (size / out) - 0.5).clamp(min=0)
    lo = x.floor().long().clamp(max=size - 1)
    frac = (x - lo).to(dtype)
    m = torch.zeros(out, size, dtype=dtype, device=device)
    rows = torch.arange(out, device=device)
    m[rows, lo] = 1 - frac
    m[rows, (lo + 1).clamp(max=size - 1)] += frac   # at the clamped end both weights fall on one index: 1 in all
    return m


def interpolate_pos_embed(table: torch.Tensor, grid: int, rows: int, cols: int) -> torch.Tensor:
    """Learned position table [grid*grid, h] (row-major) -> [rows*cols, h] row-major for one frame,
    resized bilinearly (align_corners=False, no antialias). At rows = cols = grid it is the table.

    With torch's deterministic algorithms on (train.deterministic), the resize is the same bilinear map as two
    matrix products (bilinear_matrix): F.interpolate's CUDA backward adds into the table with atomics, in no fixed
    order (torch raises in that mode). Equal to F.interpolate up to rounding (the sums run in another order)."""
    h = table.shape[1]
    if rows == grid and cols == grid:
        return table
    if torch.are_deterministic_algorithms_enabled():
        r = bilinear_matrix(rows, grid, table.dtype, table.device)
        c = bilinear_matrix(cols, grid, table.dtype, table.device)
        img = table.reshape(grid, grid, h)
        with torch.autocast(table.device.type, enabled=False):   # in the table's dtype, as F.interpolate under autocast
            return torch.einsum("rg,gkh,ck->rch", r, img, c).reshape(rows * cols, h)
    img = table.t().reshape(1, h, grid, grid)
    out = F.interpolate(img, size=(rows, cols), mode="bilinear", align_corners=False, antialias=False)
    return out.reshape(h, rows * cols).t()


def rope_2d(rows_idx: torch.Tensor, cols_idx: torch.Tensor, head_dim: int, theta: float,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim] for the rotate-half convention (Qwen2-VL vision RoPE).

    Of the head_dim/2 rotary pairs (x[j], x[j + d/2]), pairs j < d/4 rotate by row * f_j and pairs
    j >= d/4 by col * f_{j - d/4}, with f_i = theta^(-i / (d/4)) (the frequencies of a d/2-dim 1D
    RoPE). Angles are computed in at least float32."""
    q = head_dim // 4
    work = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = 1.0 / theta ** (torch.arange(0, 2 * q, 2, dtype=work, device=rows_idx.device) / (2 * q))
    ang = torch.cat([rows_idx.to(work)[:, None] * inv_freq, cols_idx.to(work)[:, None] * inv_freq], dim=-1)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., n, heads, d] rotated by cos/sin [n, d] (broadcast over heads), in cos's precision."""
    half = x.shape[-1] // 2
    xf = x.to(cos.dtype)
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return (xf * c + rot * s).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# frame grouping
# ---------------------------------------------------------------------------------------------

@dataclass
class SizeGroup:
    """Frames of one size, contiguous after the permutation: patches [start, start + nf * n)."""
    rows: int
    cols: int
    start: int
    num_frames: int
    cos: torch.Tensor  # [n, d]
    sin: torch.Tensor  # [n, d]

    @property
    def n(self) -> int:
        return self.rows * self.cols


def group_frames(sizes: list[tuple[int, int]], device) -> tuple[list[tuple[int, int, list[int]]], torch.Tensor | None]:
    """Groups frames by size (groups in first-appearance order, frames in input order inside a group).
    Returns [(rows, cols, frame indices)] and the patch permutation that makes every group contiguous
    (None when the input is already so ordered, the common case of one video per size)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for f, s in enumerate(sizes):
        by_size.setdefault(s, []).append(f)
    groups = [(r, c, fr) for (r, c), fr in by_size.items()]
    order = [f for _, _, fr in groups for f in fr]
    if order == list(range(len(sizes))):
        return groups, None
    n = torch.tensor([r * c for r, c in sizes], dtype=torch.long)
    starts = torch.cumsum(n, 0) - n
    o = torch.tensor(order, dtype=torch.long)
    lens = n[o]
    new_starts = torch.cumsum(lens, 0) - lens
    perm = torch.repeat_interleave(starts[o] - new_starts, lens) + torch.arange(int(lens.sum()))
    return groups, perm.to(device)


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------

class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden, bias=True)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=True)

    def forward(self, x: torch.Tensor, groups: list[SizeGroup]) -> torch.Tensor:
        P = x.shape[0]
        qkv = self.qkv(x).view(P, 3, self.heads, self.head_dim)
        outs = []
        for g in groups:
            blk = qkv[g.start:g.start + g.num_frames * g.n].view(g.num_frames, g.n, 3, self.heads, self.head_dim)
            q = apply_rope(blk[:, :, 0], g.cos, g.sin).transpose(1, 2)    # [nf, heads, n, d]
            k = apply_rope(blk[:, :, 1], g.cos, g.sin).transpose(1, 2)
            v = blk[:, :, 2].transpose(1, 2)
            o = sdpa(q, k, v)                                             # bidirectional within a frame
            outs.append(o.transpose(1, 2).reshape(g.num_frames * g.n, self.heads * self.head_dim))
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, cfg.mlp)
        self.fc2 = nn.Linear(cfg.mlp, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, groups: list[SizeGroup]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), groups)
        return x + self.mlp(self.norm2(x))


class SiglipViT(nn.Module):
    """The vision transformer: [P, C*p*p] pixels + grid_thw [F, 3] -> [P, hidden], same patch order.

    Patch embedding: `patch_embed.weight` [h, C*p*p] is SigLIP's Conv2d(C, h, kernel=stride=p) weight
    [h, C, p, p] flattened (`conv.weight.reshape(h, -1)`), bias identical: a stride-p conv over a
    patch is exactly this dot product with the patch flattened (C, ph, pw).

    recompute: re-run each block in backward (torch.utils.checkpoint) instead of storing its
    activations. Frozen (no parameter requires grad): the forward runs under no_grad, so no
    activations are kept even when the caller has grad mode on.
    """

    def __init__(self, cfg: VisionConfig, *, recompute: bool = False):
        super().__init__()
        self.cfg = cfg
        self.recompute = recompute
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.hidden, bias=True)
        self.pos_embed = nn.Parameter(torch.empty(cfg.pos_grid * cfg.pos_grid, cfg.hidden))
        nn.init.normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.post_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        if self.frozen() and torch.is_grad_enabled():
            with torch.no_grad():
                return self._forward(pixel_values, grid_thw)
        return self._forward(pixel_values, grid_thw)

    def _forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        sizes = validate_inputs(cfg, pixel_values, grid_thw)
        dtype, dev = self.patch_embed.weight.dtype, self.patch_embed.weight.device
        if not sizes:
            return torch.zeros(0, cfg.hidden, dtype=dtype, device=dev)
        x = self.patch_embed(normalize_pixels(cfg, pixel_values.to(dev), dtype))       # [P, h]
        size_groups, perm = group_frames(sizes, dev)
        if perm is not None:
            x = x.index_select(0, perm)
        groups: list[SizeGroup] = []
        parts = []
        start = 0
        for rows, cols, frames in size_groups:
            nf, n = len(frames), rows * cols
            slot = merge_order_index(rows, cols, cfg.merge, device=dev)
            pos = interpolate_pos_embed(self.pos_embed, cfg.pos_grid, rows, cols).index_select(0, slot)
            cos, sin = rope_2d(slot // cols, slot % cols, cfg.head_dim, cfg.rope_theta, dtype)
            parts.append((x[start:start + nf * n].view(nf, n, -1) + pos).view(nf * n, -1))
            groups.append(SizeGroup(rows, cols, start, nf, cos, sin))
            start += nf * n
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        for blk in self.blocks:
            if self.recompute and torch.is_grad_enabled():
                x = checkpoint(blk, x, groups, use_reentrant=False)
            else:
                x = blk(x, groups)
        x = self.post_norm(x)
        if perm is not None:
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=dev)
            x = x.index_select(0, inv)
        return x
