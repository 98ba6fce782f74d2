"""Scene changes for slow/fast frame encoding (Keye-VL-1.5), found once at ingest, used at planning time.

Keye-VL-1.5 splits a video's sampled frames into *slow* frames, encoded at full size, and *fast* frames,
encoded at a fraction (0.3) of a slow frame's tokens: a frame is fast when it is at least 95% similar,
patch by patch, to the last slow frame. Our planner fixes every token count from the metadata alone, before
any pixel is decoded (sampling.py), so the similarity cannot wait for the training-time decode. Ingest,
which decodes every frame anyway, finds it instead:

- it examines the frames on a grid of at most `SceneSpec.fps` frames per second of video (a frame whose
  time is at least 1 / fps after the last examined one's);
- an examined frame becomes a grey `cells` x `cells` thumbnail (each cell the mean grey level of 1/cells^2 of
  the picture, over 8 x 8 pixels spread across it, so a cell stands for a block of patches, not one pixel);
- a cell is unchanged when its mean moved by at most `tolerance` grey levels (of 255) from the reference's;
- the first frame is the reference; an examined frame whose share of unchanged cells falls below
  `similarity` is a *change*: its index is recorded and it becomes the reference.

The index stores the change indices (arithmetic runs, so a video that changes on every examined frame is
one run) with the spec that found them. At planning time a sampled frame is slow when it is the first, or
when a change lies between the previous sampled frame (exclusive) and it (inclusive): the picture moved
away from what the slow frames already show. Otherwise it is fast: it is within `similarity` of the
reference in force since the last slow frame, a frame taken no earlier than the sampled frame before that
slow frame. This is Keye's rule with the comparison made on the examined grid, not on the sampled frames
themselves (which depend on the training config).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .timeline import decode_runs, encode_runs


@dataclass(frozen=True)
class SceneSpec:
    fps: float = 4.0
    """Frames examined per second of video, at most (sampling at 2 fps sees every change one examined frame
    after it happens)."""
    cells: int = 16
    """The grey thumbnail's side: cells x cells area means."""
    tolerance: int = 12
    """A cell is unchanged when its mean grey level moved by at most this much (of 255): more than H.264's
    noise on a block mean, less than a moved edge or a lighting change."""
    similarity: float = 0.95
    """A frame is similar to the reference when at least this share of its cells are unchanged (Keye-VL-1.5's
    95%)."""

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"SceneSpec.fps = {self.fps}: must be > 0")
        if not 2 <= self.cells <= 256:
            raise ValueError(f"SceneSpec.cells = {self.cells}: must be in [2, 256]")
        if not 0 <= self.tolerance <= 255:
            raise ValueError(f"SceneSpec.tolerance = {self.tolerance}: must be in [0, 255]")
        if not 0.0 < self.similarity <= 1.0:
            raise ValueError(f"SceneSpec.similarity = {self.similarity}: must be in (0, 1]")


# pixel formats whose first plane is 8-bit luma at the full size
_LUMA8 = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "yuv440p", "yuvj440p",
                    "yuv411p", "yuv410p", "nv12", "nv21", "gray"})
SAMPLES = 8         # luma samples per cell side: a cell's mean over 8 x 8 evenly spread pixels


def thumbnail(frame, cells: int) -> np.ndarray:
    """uint8 [cells, cells]: the mean grey level of each cell of a PyAV VideoFrame. From the luma plane itself
    when the format has an 8-bit one (a mean over SAMPLES x SAMPLES pixels spread evenly over the cell: about
    0.1 ms a frame here, where swscale's conversion took 0.2-0.4 ms at 360p-720p), else by swscale's area filter."""
    if frame.format.name not in _LUMA8:
        return frame.to_ndarray(width=cells, height=cells, format="gray", interpolation="AREA")
    p = frame.planes[0]
    h, w = frame.height, frame.width
    y = np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:h, :w]
    n = cells * SAMPLES
    ys = ((np.arange(n) + 0.5) * h / n).astype(np.intp)
    xs = ((np.arange(n) + 0.5) * w / n).astype(np.intp)
    sub = y.take(ys, axis=0).take(xs, axis=1).reshape(cells, SAMPLES, cells, SAMPLES)
    m = sub.mean(axis=(1, 3), dtype=np.float32)
    full = frame.format.name.startswith("yuvj") or frame.format.name == "gray" or frame.color_range == 2
    if not full:                               # limited range: 16..235 -> 0..255, the grey levels swscale gives
        m = (m - 16.0) * (255.0 / 219.0)
    return np.clip(m, 0, 255).round().astype(np.uint8)


class SceneDetector:
    """Feed every decoded frame in presentation order (`add`); `result()` is the index entry."""

    def __init__(self, spec: SceneSpec, frame_rate: float | None) -> None:
        self.spec = spec
        self.period = 1.0 / spec.fps
        self.rate = frame_rate if frame_rate and frame_rate > 0 else 25.0   # for frames without a time
        self.changes: list[int] = []
        self.examined = 0
        self._ref: np.ndarray | None = None
        self._next = -np.inf
        self._last_t = -np.inf

    def add(self, index: int, frame) -> None:
        """`frame`: a PyAV VideoFrame. It is examined when its time has reached the next tick of the grid (a
        tick `period` after the last examined frame's time; by its index and the frame rate when it has no time;
        at once when time went backwards, as broken timestamps do), so a header's bogus rate cannot thin it."""
        t = frame.time
        if t is None:
            t = index / self.rate
        if t >= self._next or t < self._last_t:
            self._next = t + 0.999 * self.period
            self.observe(index, thumbnail(frame, self.spec.cells))
        self._last_t = t

    def observe(self, index: int, thumb: np.ndarray) -> None:
        """One examined frame's grey thumbnail [cells, cells] uint8."""
        self.examined += 1
        t = thumb.astype(np.int16)
        if self._ref is None:
            self._ref = t
            return
        same = float(np.mean(np.abs(t - self._ref) <= self.spec.tolerance))
        if same < self.spec.similarity:
            self.changes.append(int(index))
            self._ref = t

    def result(self) -> dict:
        return {"runs": encode_runs(self.changes), "count": len(self.changes), "examined": self.examined,
                **asdict(self.spec)}


def fast_frames(indices, scene_changes: dict | None) -> np.ndarray:
    """bool per sampled frame (indices sorted ascending): True where the frame is fast (see the module
    docstring). No scene-change data (a shard ingested before it existed): every frame slow."""
    idx = np.asarray(indices, np.int64)
    fast = np.zeros(idx.shape[0], bool)
    if scene_changes is None or idx.shape[0] < 2:
        return fast
    changes = decode_runs(scene_changes["runs"])
    seen = np.searchsorted(changes, idx, side="right")       # changes at or before each sampled frame
    fast[1:] = seen[1:] == seen[:-1]
    return fast
