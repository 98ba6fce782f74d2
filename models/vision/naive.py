"""Reference VisionModel forward: one frame at a time, every step written out as plain math.

Independent of vit.py's code paths on purpose (it is what the tests hold vit.py to): it rebuilds
each frame as an image from the merge-group patch order and applies SigLIP's patch embedding as the
Conv2d it is, resizes the position table with F.interpolate on the [h, G, G] grid (also at the
native size), rotates q/k with explicit per-pair cos/sin on (row, col), and computes attention with
an explicit softmax. LayerNorm and GELU are written out too. Slow; for tests only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.vision.model import VisionModel


def _layer_norm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _linear(x, lin):
    return x @ lin.weight.t() + lin.bias


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _gelu_erf(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _frame_image(pv, rows, cols, cfg, dtype):
    """Merge-order patches [n, C*p*p] -> normalised image [C, rows*p, cols*p]."""
    m, p, C = cfg.merge, cfg.patch, cfg.in_channels
    x = pv.reshape(rows // m, cols // m, m, m, C, p, p)          # bh, bw, mh, mw, C, ph, pw
    img = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(C, rows * p, cols * p)
    if pv.dtype == torch.uint8:
        img = img.to(dtype) / 255.0
        mean = torch.tensor(cfg.pixel_mean, dtype=dtype).view(C, 1, 1)
        std = torch.tensor(cfg.pixel_std, dtype=dtype).view(C, 1, 1)
        img = (img - mean) / std
    return img.to(dtype)


def _rope(x, rows_i, cols_i, theta):
    """x [n, heads, d]: pair (j, j + d/2) rotated by row * theta^(-j/(d/4)) for j < d/4, else by
    col * theta^(-(j - d/4)/(d/4))."""
    n, H, d = x.shape
    q = d // 4
    out = x.clone()
    for j in range(d // 2):
        pos = rows_i if j < q else cols_i
        i = j if j < q else j - q
        ang = pos.to(x.dtype) * theta ** (-i / q)
        c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        a, b = x[:, :, j], x[:, :, j + d // 2]
        out[:, :, j] = a * c - b * s
        out[:, :, j + d // 2] = a * s + b * c
    return out


def _attention(x, attn, heads, rows_i, cols_i, theta):
    n, h = x.shape
    d = h // heads
    qkv = _linear(x, attn.qkv).view(n, 3, heads, d)
    q = _rope(qkv[:, 0], rows_i, cols_i, theta)
    k = _rope(qkv[:, 1], rows_i, cols_i, theta)
    v = qkv[:, 2]
    out = torch.empty(n, heads, d, dtype=x.dtype)
    for hd in range(heads):
        s = q[:, hd] @ k[:, hd].t() / math.sqrt(d)
        e = torch.exp(s - s.max(-1, keepdim=True).values)
        out[:, hd] = (e / e.sum(-1, keepdim=True)) @ v[:, hd]
    return _linear(out.reshape(n, h), attn.proj)


@torch.no_grad()
def naive_forward(model: VisionModel, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """[P, C*p*p] + [F, 3] -> [P / merge**2, lm_hidden], one frame at a time."""
    cfg, vit, proj = model.cfg, model.vit, model.projector
    dtype = vit.patch_embed.weight.dtype
    h, p, m, G = cfg.hidden, cfg.patch, cfg.merge, cfg.pos_grid
    conv_w = vit.patch_embed.weight.reshape(h, cfg.in_channels, p, p)
    outs = []
    off = 0
    for _, rows, cols in grid_thw.tolist():
        n = rows * cols
        img = _frame_image(pixel_values[off:off + n], rows, cols, cfg, dtype)
        off += n
        x = F.conv2d(img[None], conv_w, vit.patch_embed.bias, stride=p)[0]        # [h, rows, cols]
        x = x.reshape(h, n).t()                                                     # row-major tokens
        table = vit.pos_embed.t().reshape(1, h, G, G)
        pos = F.interpolate(table, size=(rows, cols), mode="bilinear", align_corners=False)
        x = x + pos.reshape(h, n).t()
        rr = torch.arange(n) // cols
        cc = torch.arange(n) % cols
        for blk in vit.blocks:
            x = x + _attention(_layer_norm(x, blk.norm1), blk.attn, cfg.heads, rr, cc, cfg.rope_theta)
            y = _layer_norm(x, blk.norm2)
            x = x + _linear(_gelu_tanh(_linear(y, blk.mlp.fc1)), blk.mlp.fc2)
        x = _layer_norm(_layer_norm(x, vit.post_norm), proj.norm)
        # row-major [rows, cols, h] -> merge groups [rows/m * cols/m, m*m*h], patches in (mh, mw) order
        x = x.reshape(rows // m, m, cols // m, m, h).permute(0, 2, 1, 3, 4).reshape(-1, m * m * h)
        outs.append(_linear(_gelu_erf(_linear(x, proj.fc1)), proj.fc2))
    if not outs:
        return torch.zeros(0, cfg.lm_hidden, dtype=dtype)
    return torch.cat(outs)
