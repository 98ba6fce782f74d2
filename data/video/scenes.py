"""Scene changes for slow/fast frame encoding (Keye-VL-1.5), found once at ingest, used at planning time.

Keye-VL-1.5 splits a video's sampled frames into *slow* frames, encoded at full size, and *fast* frames,
encoded at a fraction (0.3) of a slow frame's tokens: a frame is fast when it is at least 95% similar,
patch by patch, to the last slow frame. Our planner fixes every token count from the metadata alone, before
any pixel is decoded (sampling.py), so the similarity cannot wait for the training-time decode. Ingest,
which decodes every frame anyway, finds it instead:

- it examines the frames on a grid of at most `SceneSpec.fps` frames per second of video (every
  `stride`-th decoded frame, from the header's frame rate);
- an examined frame becomes a grey `cells` x `cells` thumbnail of area means (each cell the mean grey
  level of 1/cells^2 of the picture, so a cell stands for a block of patches, not one pixel);
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


class SceneDetector:
    """Feed every decoded frame in presentation order (`add`); `result()` is the index entry."""

    def __init__(self, spec: SceneSpec, frame_rate: float | None) -> None:
        self.spec = spec
        self.stride = max(1, int(round((frame_rate or 25.0) / spec.fps)))
        self.changes: list[int] = []
        self.examined = 0
        self._ref: np.ndarray | None = None

    def add(self, index: int, frame) -> None:
        """`frame`: a PyAV VideoFrame (only every `stride`-th is converted)."""
        if index % self.stride:
            return
        c = self.spec.cells
        self.observe(index, frame.to_ndarray(width=c, height=c, format="gray", interpolation="AREA"))

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
        return {"runs": encode_runs(self.changes), "count": len(self.changes), "stride": self.stride,
                "examined": self.examined, **asdict(self.spec)}


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
