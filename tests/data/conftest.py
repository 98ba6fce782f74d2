"""Shared fixtures for the video data tests: one small synthetic dataset per session.

Videos are tiny (64x48 .. 160x120, 1.5-4 s at 8-15 fps) and token budgets are scaled down
(4-16 tokens per frame, 1024-token sequences) so that the whole tests/data tier stays within a few
CPU-minutes on a 2-core machine.
"""
from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import pytest

from data.video.config import VideoDataConfig


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from data.video.synthetic import make_synthetic_shards

    out = tmp_path_factory.mktemp("synth")
    make_synthetic_shards(out, n_videos=16, seed=7, shard_size_mb=0.04, workers=2)
    return out


@pytest.fixture(scope="session")
def shard_dir(synth_dir) -> Path:
    return synth_dir / "shards"


@pytest.fixture(scope="session")
def counter_bits(synth_dir) -> dict[str, int]:
    """sample key -> number of counter bits burned into that video."""
    out = {}
    from data.video.shards import load_catalog

    for r in load_catalog(str(synth_dir / "shards")):
        out[r.key] = int(r.annotation["counter_bits"])
    return out


def small_cfg(shards, tmp_path=None, **overrides) -> VideoDataConfig:
    kw = dict(shards=str(shards), seq_len=1024, min_frames=2, max_frames=16, min_frame_tokens=4,
              max_frame_tokens=16, min_video_tokens=16, video_tokens_per_second=24.0, max_text_tokens=256,
              num_workers=0, shuffle_buffer=4, pack_lookahead=4, sample_timeout_s=60.0,
              quarantine_path=str(Path(tmp_path) / "quarantine.jsonl") if tmp_path else "")
    kw.update(overrides)
    return VideoDataConfig(**kw)


def read_jsonl(path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def is_mapped(a: np.ndarray) -> bool:
    """Whether `a` reads a memory-mapped file (as data/node_files.shared_arrays returns them) rather than process
    memory."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False
