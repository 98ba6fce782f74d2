"""Typed configuration of the native-resolution SigLIP ViT and its 2x2 patch-merger projector.

Sizes follow SigLIP-so400m-patch14 (the Keye-VL vision tower); `tiny` is for CPU tests. The
projector's output width is the language model's hidden size, so it is an argument of every preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    """Sizes of the ViT and projector.

    depth / hidden / heads / mlp: transformer layers, width, attention heads, MLP intermediate width.
    patch: pixels per patch side; in_channels: 3 (RGB); merge: patch-merger side (2 -> 4 patches per
    LM token). pos_grid: side of the learned absolute position table (27 -> 729 entries for
    so400m at 384 px), interpolated to every frame's grid. lm_hidden: projector output width.
    pixel_mean / pixel_std: per-channel normalisation applied to uint8 pixels after scaling to [0, 1]
    (SigLIP: 0.5 / 0.5, i.e. pixels land in [-1, 1]).
    """

    depth: int
    hidden: int
    heads: int
    mlp: int
    lm_hidden: int
    patch: int = 14
    in_channels: int = 3
    merge: int = 2
    pos_grid: int = 27
    layer_norm_eps: float = 1e-6
    projector_norm_eps: float = 1e-5  # Keye-VL's projector LayerNorm (mlp_AR.pre_norm) hard-codes 1e-5
    rope_theta: float = 10000.0
    pixel_mean: tuple[float, ...] = field(default_factory=lambda: (0.5, 0.5, 0.5))
    pixel_std: tuple[float, ...] = field(default_factory=lambda: (0.5, 0.5, 0.5))

    def __post_init__(self) -> None:
        for name in ("depth", "hidden", "heads", "mlp", "lm_hidden", "patch", "in_channels", "merge", "pos_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"vision.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"vision.hidden ({self.hidden}) must be divisible by vision.heads ({self.heads})")
        if self.head_dim % 4:
            # 2D RoPE: half of the rotary pairs rotate with the row index, half with the column, and
            # each half needs whole (x, y) pairs, so head_dim must be a multiple of 4.
            raise ValueError(f"vision head_dim = hidden / heads = {self.hidden} / {self.heads} = {self.head_dim} "
                             f"must be divisible by 4 for 2D RoPE (row and column halves of rotary pairs)")
        self.pixel_mean = tuple(float(x) for x in self.pixel_mean)
        self.pixel_std = tuple(float(x) for x in self.pixel_std)
        if len(self.pixel_mean) != self.in_channels or len(self.pixel_std) != self.in_channels:
            raise ValueError(f"vision.pixel_mean ({len(self.pixel_mean)} values) and vision.pixel_std "
                             f"({len(self.pixel_std)}) need one value per channel (in_channels={self.in_channels})")
        if min(self.pixel_std) <= 0:
            raise ValueError(f"vision.pixel_std must be > 0, got {self.pixel_std}")
        if self.layer_norm_eps <= 0 or self.projector_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"vision.layer_norm_eps ({self.layer_norm_eps}), vision.projector_norm_eps "
                             f"({self.projector_norm_eps}) and vision.rope_theta ({self.rope_theta}) must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: in_channels * patch * patch, flattened (C, ph, pw)."""
        return self.in_channels * self.patch * self.patch

    @property
    def merge_tokens(self) -> int:
        """Patches per merged LM token (merge ** 2)."""
        return self.merge * self.merge

    def num_params(self) -> int:
        """Parameter count of ViT + projector (no allocation)."""
        h, m = self.hidden, self.mlp
        embed = self.patch_dim * h + h + self.pos_grid ** 2 * h
        block = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h)
        post = 2 * h
        return embed + self.depth * block + post + self.projector_params()

    def projector_params(self) -> int:
        """Parameter count of the 2x2 patch-merger projector alone (LayerNorm, fc1, fc2)."""
        mh = self.merge_tokens * self.hidden
        return 2 * self.hidden + (mh * mh + mh) + (mh * self.lm_hidden + self.lm_hidden)


def so400m(lm_hidden: int) -> VisionConfig:
    """SigLIP-so400m-patch14-384 sizes (27 layers, width 1152, 16 heads, MLP 4304, 27x27 positions)."""
    return VisionConfig(depth=27, hidden=1152, heads=16, mlp=4304, patch=14, pos_grid=27, lm_hidden=lm_hidden)


def tiny(lm_hidden: int) -> VisionConfig:
    """A CPU-test size: 2 layers, width 64, 4 heads (head_dim 16), MLP 128, a 6x6 position table."""
    return VisionConfig(depth=2, hidden=64, heads=4, mlp=128, patch=14, pos_grid=6, lm_hidden=lm_hidden)
