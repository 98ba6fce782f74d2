"""Sampling plan: which frames, at what size, how many tokens — pure functions of the metadata.

`plan_frames(video_meta, cfg, seed=, epoch=, key=)` decides everything before any decoding:

1. Per-video visual budget grows with duration (Keye-VL-2.0: longer videos get proportionally more
   tokens): `budget = clamp(duration * video_tokens_per_second, min_video_tokens, max_video_tokens)`,
   further capped so that the sample fits one packed sequence (`token_cap`).
2. Frame count: `round(duration * sample_fps)` clamped to [min_frames, max_frames] and to the
   verified number of frames; lowered further if even `min_frame_tokens` per frame would overrun
   the budget.
3. Tokens per frame: `budget // n_frames` clamped to [min_frame_tokens, max_frame_tokens]; the frame
   is resized keeping its aspect ratio to sides that are multiples of patch*merge (28), so that
   (H/28)*(W/28) merged tokens fit that share (`snap_frame_size`); if the aspect ratio forces a
   slightly larger grid, the frame count is lowered so that frames x tokens <= budget.
4. Timestamps: n evenly spaced targets at interval mid-points, (k + 0.5) * duration / n (optionally
   jittered by a seeded fraction of the interval); each picks the frame on screen at that time from
   the verified pts, and the frame's own time is what the text timestamp "<12.5s>" shows.
5. Slow and fast frames (`fast_frame_ratio` > 0, Keye-VL-1.5): a sampled frame with no scene change (found
   at ingest, `scenes.py`) since the frame sampled before it is *fast*: it gets at most `fast_frame_ratio` of a
   slow frame's tokens (its own size, aspect kept; "<12.5s fast>" precedes it). The frame count is then lowered only while even the
   smallest slow and fast frames overrun the budget, so a still video keeps more of its frames; the slow size
   is the largest whose frames fit. Without scene data every frame is slow and the plan is exactly the plan
   without fast frames.

Token counts are therefore known from metadata alone, so packing is planned before decoding.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from .config import VideoDataConfig
from .scenes import fast_frames
from .timeline import FrameTimeline


class PlanError(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FramePlan:
    indices: tuple[int, ...]        # sorted unique frame indices into the verified frame list
    timestamps: tuple[float, ...]   # seconds from the first frame, one per index
    height: int                     # resized display size, multiples of patch*merge
    width: int
    tokens_per_frame: int           # merged (LM) tokens per frame = (height/28) * (width/28)
    interval_s: float               # nominal spacing of the sampled frames
    budget: int                     # visual-token budget the plan was made for
    fast: tuple[bool, ...] = ()     # per frame, True = a fast frame (slow/fast encoding); () = every frame slow
    fast_height: int = 0            # a fast frame's size and merged tokens (0 when there is none)
    fast_width: int = 0
    fast_tokens_per_frame: int = 0

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    @property
    def num_fast(self) -> int:
        return sum(self.fast)

    @property
    def visual_tokens(self) -> int:
        nf = self.num_fast
        return (self.num_frames - nf) * self.tokens_per_frame + nf * self.fast_tokens_per_frame

    def is_fast(self, k: int) -> bool:
        return bool(self.fast) and self.fast[k]

    def size(self, k: int) -> tuple[int, int]:
        """(height, width) of frame k."""
        return (self.fast_height, self.fast_width) if self.is_fast(k) else (self.height, self.width)

    def runs(self) -> list[tuple[int, int, int, int]]:
        """(first, end, height, width) of each run of consecutive frames of one size, in frame order."""
        out, k0 = [], 0
        for k in range(1, self.num_frames + 1):
            if k == self.num_frames or self.is_fast(k) != self.is_fast(k0):
                out.append((k0, k, *self.size(k0)))
                k0 = k
        return out

    def patches(self, patch_size: int) -> int:
        """ViT patches of all the frames."""
        nf, p = self.num_fast, patch_size
        return ((self.num_frames - nf) * (self.height // p) * (self.width // p)
                + nf * (self.fast_height // p) * (self.fast_width // p))

    def grid(self, patch_size: int, merge_size: int, k: int = 0) -> tuple[int, int]:
        """(rows, cols) of merged tokens of frame k (every frame's, without fast frames)."""
        f = patch_size * merge_size
        h, w = self.size(k)
        return h // f, w // f


def video_token_budget(duration_s: float, cfg: VideoDataConfig) -> int:
    """Visual tokens one video may use, growing linearly with its duration up to the cap."""
    b = int(round(duration_s * cfg.video_tokens_per_second))
    return int(min(cfg.max_video_tokens, max(cfg.min_video_tokens, b)))


@functools.lru_cache(maxsize=1 << 16)    # pure; videos share a few sizes, and slow/fast plans search over it
def snap_frame_size(height: int, width: int, *, factor: int, min_tokens: int, max_tokens: int,
                    max_aspect_ratio: float = 200.0) -> tuple[int, int]:
    """Resize (height, width) to sides that are multiples of `factor`, keeping the aspect ratio.

    Grids (rows, cols) with cols = round(rows * aspect) are the candidates. The native size
    (rounded to the factor) is kept when its token count rows*cols lies in [min_tokens, max_tokens];
    a larger frame takes the largest candidate <= max_tokens (and >= min_tokens), a smaller one the
    smallest candidate >= min_tokens. When no candidate lies in the range (a narrow range and an
    awkward aspect ratio) the smallest candidate >= min_tokens is used, so the result may exceed
    max_tokens slightly; `plan_frames` then uses fewer frames to stay within the video budget.
    """
    if height < 1 or width < 1:
        raise PlanError("bad_dimensions", f"{width}x{height}")
    if max(height, width) / min(height, width) > max_aspect_ratio:
        raise PlanError("aspect_ratio", f"{width}x{height} exceeds {max_aspect_ratio}:1")
    nat_r = max(1, round(height / factor))
    nat_c = max(1, round(width / factor))
    if min_tokens <= nat_r * nat_c <= max_tokens:
        return nat_r * factor, nat_c * factor
    aspect = width / height
    limit = max(max_tokens, min_tokens) * 2 + 2
    grids: list[tuple[float, int, int, int]] = []     # (aspect error, tokens, rows, cols)
    for r in range(1, limit + 1):
        for c in {max(1, math.floor(r * aspect)), max(1, math.ceil(r * aspect))}:
            if r * c <= limit:
                grids.append((abs(math.log(c / r / aspect)), r * c, r, c))
    if not grids:          # even one row/column of cells exceeds the budget: a 1-cell-thick strip
        n = max(1, max_tokens)
        return (factor, n * factor) if aspect >= 1 else (n * factor, factor)
    for tol in (0.1, 0.25, math.inf):
        cands = [(t, -e, r, c) for e, t, r, c in grids if e <= tol]
        in_range = [x for x in cands if min_tokens <= x[0] <= max_tokens]
        above_min = [x for x in cands if x[0] >= min_tokens]
        if nat_r * nat_c > max_tokens and in_range:
            _, _, r, c = max(in_range)                 # largest, then best aspect
            break
        if above_min:
            t0 = min(x[0] for x in above_min)
            _, _, r, c = max(x for x in above_min if x[0] == t0)
            break
    else:
        _, _, r, c = max((t, -e, r, c) for e, t, r, c in grids)
    return int(r * factor), int(c * factor)


def sample_rng(seed: int, epoch: int, key: str, salt: str = "") -> np.random.Generator:
    """Per-sample RNG: a pure function of (seed, epoch, sample key); no RNG state to save."""
    d = hashlib.blake2b(f"{seed}/{epoch}/{key}/{salt}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(d, "little"))


def plan_frames(video: dict, cfg: VideoDataConfig, *, seed: int = 0, epoch: int = 0, key: str = "",
                token_cap: int | None = None) -> FramePlan:
    """The sampling plan of one video (see module docstring). `video` is the verified metadata."""
    tl = FrameTimeline.from_meta(video)
    n_avail = tl.num_frames
    duration = tl.duration
    if n_avail < 1 or not duration > 0:
        raise PlanError("empty_video", f"{n_avail} frames, {duration} s")
    factor = cfg.frame_factor
    budget = video_token_budget(duration, cfg)
    if token_cap is not None:
        budget = min(budget, int(token_cap))
    n = int(round(duration * cfg.sample_fps))
    n = max(cfg.min_frames, min(cfg.max_frames, n))
    n = max(1, min(n, n_avail))
    ratio = cfg.fast_frame_ratio
    changes = video.get("scene_changes") if ratio > 0 else None

    def frames_for(n: int) -> tuple[float, np.ndarray, np.ndarray]:
        """(interval, frame indices, fast flags) of n evenly spaced (optionally jittered) targets."""
        interval = duration / n
        offsets = np.full(n, 0.5)
        if cfg.frame_jitter > 0:
            rng = sample_rng(seed, epoch, key, "frames")
            offsets = offsets + cfg.frame_jitter * (rng.random(n) - 0.5)
        idx = np.unique(tl.index_at((np.arange(n) + offsets) * interval))
        return interval, idx, fast_frames(idx, changes)

    def does_not_fit(per_frame: int) -> PlanError:
        return PlanError("does_not_fit", f"budget {budget} < {min(cfg.min_frames, n_avail)} frames x "
                                         f"{per_frame} tokens")

    interval, idx, fast = frames_for(n)
    nf = int(fast.sum())
    fast_min = max(1, int(ratio * cfg.min_frame_tokens))
    while (least := (n - nf) * cfg.min_frame_tokens + nf * fast_min) > budget:
        n = min(n - 1, n * budget // least)    # fewer frames (without fast frames: budget // min_frame_tokens)
        if n < min(cfg.min_frames, n_avail):
            raise does_not_fit(cfg.min_frame_tokens)
        interval, idx, fast = frames_for(n)
        nf = int(fast.sum())

    def sizes(max_tokens: int) -> tuple[int, int, int, int, int, int]:
        """(h, w, tokens) of a slow frame of at most `max_tokens` and of its fast frame (0s without scene data)."""
        h, w = snap_frame_size(int(video["height"]), int(video["width"]), factor=factor,
                               min_tokens=cfg.min_frame_tokens, max_tokens=max_tokens,
                               max_aspect_ratio=cfg.max_aspect_ratio)
        tpf = (h // factor) * (w // factor)
        if changes is None:
            return h, w, tpf, 0, 0, 0
        fh, fw = snap_frame_size(int(video["height"]), int(video["width"]), factor=factor, min_tokens=1,
                                 max_tokens=max(1, int(ratio * tpf)), max_aspect_ratio=cfg.max_aspect_ratio)
        return h, w, tpf, fh, fw, (fh // factor) * (fw // factor)

    # a slow frame's share: the budget over the frames, a fast one counting `ratio` of a slow one
    per_frame = max(cfg.min_frame_tokens, min(cfg.max_frame_tokens, int(budget // (n - nf + ratio * nf))))
    h, w, tpf, fh, fw, ftpf = sizes(per_frame)
    if nf:
        # snapping to the grid moves both sizes off their shares (a small fast frame by as much as half), so
        # search the largest slow frame whose frames fit (Keye-VL-1.5 searches the slow size the same way);
        # fewer frames only when none does
        lo, hi = cfg.min_frame_tokens - 1, cfg.max_frame_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            cand = sizes(mid)
            if cand[5] < cand[2] and (n - nf) * cand[2] + nf * cand[5] <= budget:
                (h, w, tpf, fh, fw, ftpf), lo = cand, mid
            else:
                hi = mid - 1
        if ftpf >= tpf:                        # an aspect ratio no smaller grid keeps: every frame slow
            changes, fast, nf = None, np.zeros_like(fast), 0
            h, w, tpf, fh, fw, ftpf = sizes(per_frame)
    total = (n - nf) * tpf + nf * ftpf
    if total > budget:                         # the snapped sizes overshot the shares: fewer frames
        n_fit = n * budget // total            # (without fast frames: budget // tpf)
        while n_fit >= 1:
            interval, idx, fast = frames_for(n_fit)
            nf = int(fast.sum())
            if (n_fit - nf) * tpf + nf * ftpf <= budget:
                break
            n_fit -= 1
        if n_fit < min(cfg.min_frames, n_avail):
            raise does_not_fit(tpf)
    times = tl.times()[idx]
    extra = {}
    if nf:
        extra = dict(fast=tuple(bool(f) for f in fast), fast_height=fh, fast_width=fw, fast_tokens_per_frame=ftpf)
    return FramePlan(indices=tuple(int(i) for i in idx), timestamps=tuple(float(t) for t in times),
                     height=h, width=w, tokens_per_frame=tpf, interval_s=float(interval), budget=budget, **extra)


def plan_image(image: dict, cfg: VideoDataConfig, *, token_cap: int | None = None) -> FramePlan:
    """The plan of an image sample: one frame at its displayed size snapped to multiples of 28 with
    [min_image_tokens, max_image_tokens] merged tokens (its native size when that fits), fewer when
    `token_cap` (what the sequence leaves after the text) is smaller. `image` is the verified metadata."""
    cap = cfg.max_image_tokens if token_cap is None else min(cfg.max_image_tokens, int(token_cap))
    if cap < cfg.min_image_tokens:
        raise PlanError("does_not_fit", f"room for {cap} image tokens < min_image_tokens {cfg.min_image_tokens}")
    factor = cfg.frame_factor
    h, w = snap_frame_size(int(image["height"]), int(image["width"]), factor=factor,
                           min_tokens=cfg.min_image_tokens, max_tokens=cap, max_aspect_ratio=cfg.max_aspect_ratio)
    tokens = (h // factor) * (w // factor)
    if token_cap is not None and tokens > token_cap:        # an aspect ratio the range cannot hold
        raise PlanError("does_not_fit", f"{image['width']}x{image['height']} needs {tokens} tokens, room for {cap}")
    return FramePlan(indices=(0,), timestamps=(0.0,), height=h, width=w, tokens_per_frame=tokens,
                     interval_s=1.0, budget=cap)


def timestamp_text(t: float, fast: bool = False) -> str:
    """The text timestamp that precedes a frame, e.g. '<12.5s>'; a fast frame's says so: '<12.5s fast>'."""
    return f"<{t:.1f}s fast>" if fast else f"<{t:.1f}s>"
