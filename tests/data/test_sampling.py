"""Sampling plan: frame counts, per-frame and per-video token budgets, sizes, timestamps."""
import math

import numpy as np
import pytest

from data.video.config import VideoDataConfig
from data.video.sampling import (PlanError, plan_frames, snap_frame_size, timestamp_text,
                                 video_token_budget)
from data.video.timeline import FrameTimeline, decode_runs, encode_runs


def meta(duration_s: float, fps: float = 30.0, width: int = 1280, height: int = 720, tb: int = 90000,
         pts=None) -> dict:
    if pts is None:
        step = int(round(tb / fps))
        n = int(round(duration_s * fps))
        pts = list(range(0, n * step, step))
        end = n * step
    else:
        end = pts[-1] + (pts[-1] - pts[-2])
    return {"num_frames": len(pts), "width": width, "height": height, "rotation": 0,
            "time_base": [1, tb], "pts_runs": encode_runs(pts), "end_pts": end}


CFG = VideoDataConfig()


@pytest.mark.parametrize("duration", [1.0, 3.3, 10.0, 61.0, 300.0, 900.0, 3600.0, 7200.0])
@pytest.mark.parametrize("size", [(1280, 720), (640, 360), (720, 1280), (1920, 1080), (100, 700), (352, 240)])
def test_budgets_sizes_and_timestamps(duration, size):
    w, h = size
    m = meta(duration, width=w, height=h)
    p = plan_frames(m, CFG, key="k")
    f = CFG.frame_factor
    # sizes: multiples of 28, tokens per frame within 64..256, aspect kept (within one 28-px step)
    assert p.height % f == 0 and p.width % f == 0
    assert p.tokens_per_frame == (p.height // f) * (p.width // f)
    assert 64 <= p.tokens_per_frame <= 256
    assert abs(p.width / p.height - w / h) <= (w / h) * (f / min(p.width, p.height)) * 1.5 + 1e-9
    # per-video budget: scales with duration up to the cap, and is respected
    budget = video_token_budget(duration, CFG)
    assert p.budget == budget and p.visual_tokens <= budget
    assert budget == min(CFG.max_video_tokens, max(CFG.min_video_tokens, round(duration * 256)))
    # frames: 2 fps while the budget allows, within [min_frames, max_frames]
    want = min(CFG.max_frames, max(CFG.min_frames, round(duration * 2)))
    assert p.num_frames == min(want, budget // p.tokens_per_frame)
    if want * 64 > budget:                 # budget-bound: the smallest frames that keep the aspect
        assert p.tokens_per_frame <= 72
    # timestamps: increasing, equal to the chosen frames' times, near the interval mid-points
    tl = FrameTimeline.from_meta(m)
    ts = np.array(p.timestamps)
    assert np.all(np.diff(ts) > 0) and np.allclose(ts, tl.times()[list(p.indices)])
    mids = (np.arange(p.num_frames) + 0.5) * duration / p.num_frames
    assert np.all(np.abs(ts - mids) <= 1.0 / 30 + 1e-6)


def test_longer_videos_get_more_tokens_up_to_the_cap():
    tot = [plan_frames(meta(d), CFG).visual_tokens for d in (5, 30, 120, 400, 720, 3600)]
    assert all(b >= a for a, b in zip(tot, tot[1:]))
    assert tot[-1] <= 184_320 and tot[-1] > 0.95 * 184_320
    assert tot[0] < tot[2] < tot[3]


def test_hour_long_video_plan():
    p = plan_frames(meta(3600.0, fps=25), CFG)
    assert p.visual_tokens <= CFG.max_video_tokens
    assert p.num_frames == CFG.max_video_tokens // p.tokens_per_frame and 64 <= p.tokens_per_frame <= 72
    assert 1.2 < p.interval_s < 1.4


def test_token_cap_and_does_not_fit():
    p = plan_frames(meta(600.0), CFG, token_cap=8192)
    assert p.visual_tokens <= 8192
    with pytest.raises(PlanError) as e:
        plan_frames(meta(600.0), CFG, token_cap=100)
    assert e.value.reason == "does_not_fit"


def test_short_video_uses_all_frames_it_has():
    m = meta(0.4, fps=5)               # 2 frames only
    p = plan_frames(m, CFG)
    assert p.indices == (0, 1)


def test_snap_frame_size_bounds():
    for h, w in [(48, 64), (720, 1280), (2160, 3840), (30, 2000), (1000, 1000)]:
        for lo, hi in [(64, 256), (4, 16), (64, 64)]:
            H, W = snap_frame_size(h, w, factor=28, min_tokens=lo, max_tokens=hi)
            t = (H // 28) * (W // 28)
            # a range as narrow as one value may be overshot a little to keep the aspect ratio
            assert H % 28 == 0 and W % 28 == 0 and (t <= hi or (lo == hi and t <= 1.15 * hi))
            # aspect kept up to the rounding of a side to whole 28-px cells
            tol = max(0.1, 0.75 / min(H // 28, W // 28))
            if max(h, w) / min(h, w) < 8:     # extreme strips are squashed to fit the budget
                assert abs(math.log((W / H) / (w / h))) <= tol
            if max(h, w) / min(h, w) < 8:
                assert t >= lo
    with pytest.raises(PlanError):
        snap_frame_size(1, 1000, factor=28, min_tokens=4, max_tokens=16)


def test_jitter_is_a_pure_function_of_seed_epoch_key():
    cfg = VideoDataConfig(frame_jitter=0.8)
    m = meta(60.0)
    a = plan_frames(m, cfg, seed=1, epoch=0, key="x")
    assert a == plan_frames(m, cfg, seed=1, epoch=0, key="x")
    assert a.indices != plan_frames(m, cfg, seed=1, epoch=1, key="x").indices
    assert a.indices != plan_frames(m, cfg, seed=1, epoch=0, key="y").indices


def test_vfr_timeline_and_runs():
    rng = np.random.default_rng(0)
    pts = np.cumsum(rng.integers(20, 60, 200)).tolist()
    assert decode_runs(encode_runs(pts)).tolist() == pts
    assert len(encode_runs(list(range(0, 3000 * 512, 512)))) == 1
    m = meta(0, pts=pts, tb=1000)
    tl = FrameTimeline.from_meta(m)
    t = tl.times()
    q = rng.uniform(0, t[-1], 50)
    idx = tl.index_at(q)
    assert np.all(t[idx] <= q) and np.all((idx == len(t) - 1) | (t[np.minimum(idx + 1, len(t) - 1)] > q))
    p = plan_frames(m, CFG)
    assert np.allclose(p.timestamps, t[list(p.indices)])


def test_timestamp_text():
    assert timestamp_text(0.5) == "<0.5s>" and timestamp_text(3599.94) == "<3599.9s>"
    assert math.isclose(float(timestamp_text(12.25)[1:-2]), 12.2, abs_tol=0.1)
