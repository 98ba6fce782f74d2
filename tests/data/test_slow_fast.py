"""Slow and fast frames (Keye-VL-1.5's slow/fast video encoding; docs/data.md "Slow and fast frames").

Ingest finds the scene changes of each video; the planner makes a sampled frame *fast* (a fraction of a slow
frame's tokens) when no change lies between it and the frame sampled before it; the loader decodes every frame
at the slow size and shrinks the fast ones.
References independent of the code under test: the still scenes written into the synthetic clips (their first
frames are the ground truth of the changes), a plain loop over the sampled frames for the slow/fast rule, the
number burned into every frame (read back from the decoded pixels at its own size), the planner with slow/fast
off (what a video without scene data must plan exactly), and one loader read straight through (resume).
"""
import dataclasses
import logging

import numpy as np
import pytest

from data.video.config import VideoDataConfig
from data.video.ingest import IngestOptions, ingest, main as ingest_main
from data.video.loader import VideoPackedLoader
from data.video.packing import build_document, frame_runs, patchify
from data.video.backends import DecodeRequest, decode_frames, frame_sizes, frame_views, shrink_planar
from data.video.probe import inspect_video, probe_video
from data.video.sampling import PlanError, plan_frames
from data.video.scenes import SceneSpec, fast_frames
from data.video.shards import load_catalog
from data.video.synthetic import (SYNTHETIC_SCENE_SIMILARITY, VideoSpec, make_synthetic_shards,
                                  make_synthetic_videos, read_counter, write_video)
from data.video.timeline import encode_runs

from .conftest import small_cfg
from .test_loader import assert_resumes_exactly, documents, take


@pytest.mark.parametrize("n_frames,scenes", [(48, 4), (50, 3), (61, 5)])
def test_ingest_finds_the_still_scenes(tmp_path, n_frames, scenes):
    """Every scene cut is found on the first examined frame at or after it, and nothing else is: the counter
    band moving on every frame stays under the synthetic clips' similarity."""
    truth = write_video(tmp_path / "v.mp4", VideoSpec(n_frames=n_frames, fps=12.0, scenes=scenes, width=128, height=96))
    sc = probe_video(str(tmp_path / "v.mp4"), scenes=SceneSpec(similarity=SYNTHETIC_SCENE_SIMILARITY))["scene_changes"]
    stride = round(12.0 / 4.0)                         # 4 examined frames per second of a 12 fps clip
    want = [-(-s // stride) * stride for s in truth["scene_starts"][1:]]      # first examined frame >= the cut
    assert sc["examined"] == -(-n_frames // stride)
    assert np.array_equal(np.concatenate([np.arange(a, a + b * c, b) if c > 1 else [a] for a, b, c in sc["runs"]]),
                          want) and sc["count"] == len(want), (sc, want)


def test_scene_search_follows_frame_times_in_a_variable_rate_video(tmp_path):
    truth = write_video(tmp_path / "v.mp4", VideoSpec(n_frames=60, fps=12.0, scenes=4, width=128, height=96, vfr=True))
    sc = probe_video(str(tmp_path / "v.mp4"), scenes=SceneSpec(similarity=SYNTHETIC_SCENE_SIMILARITY))["scene_changes"]
    got = [a + b * k for a, b, c in sc["runs"] for k in range(c)]
    starts = truth["scene_starts"] + [60]
    times = truth["times"]
    assert len(got) == 3, (got, starts)
    # found in its own scene, at most a tick (0.25 s) and one frame (this clip's longest: 1.5 / 12 s) after the cut
    for c, s, nxt in zip(got, starts[1:], starts[2:]):
        assert s <= c < nxt and times[c] - times[s] <= 0.25 + 1.5 / 12 + 1e-6, (got, starts)
    assert sc["examined"] <= 4 * truth["duration"] + 1


def test_a_moving_picture_changes_at_real_video_similarity(tmp_path):
    # the plain synthetic clip moves on every frame: at Keye's 95% the examined frames keep changing
    write_video(tmp_path / "m.mp4", VideoSpec(n_frames=48, fps=12.0, width=128, height=96))
    sc = probe_video(str(tmp_path / "m.mp4"), scenes=SceneSpec())["scene_changes"]
    assert sc["similarity"] == 0.95 and sc["count"] >= sc["examined"] // 2, sc
    assert "scene_changes" not in probe_video(str(tmp_path / "m.mp4"))


def test_fast_frame_rule_against_a_loop():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_avail = int(rng.integers(2, 400))
        changes = np.unique(rng.integers(1, n_avail, size=int(rng.integers(0, 30))))
        idx = np.unique(rng.integers(0, n_avail, size=int(rng.integers(1, 40))))
        want = [k > 0 and not any(idx[k - 1] < c <= idx[k] for c in changes) for k in range(len(idx))]
        got = fast_frames(idx, {"runs": encode_runs(changes.tolist())})
        assert got.tolist() == want
        assert not fast_frames(idx, None).any()       # no scene data: every frame slow


def _meta(n_frames: int, fps: float, height: int, width: int, changes=None) -> dict:
    m = {"pts_runs": encode_runs(range(n_frames)), "time_base": [1000, int(round(fps * 1000))], "end_pts": n_frames,
         "height": height, "width": width, "num_frames": n_frames}
    if changes is not None:
        m["scene_changes"] = {"runs": encode_runs(sorted(changes))}
    return m


def _random_case(rng):
    fps = float(rng.choice([8.0, 25.0, 30.0]))
    n = int(rng.integers(2, 3000))
    meta = _meta(n, fps, int(rng.integers(40, 1500)), int(rng.integers(40, 1500)),
                 changes=np.unique(rng.integers(1, n, size=int(rng.integers(0, max(1, n // 10))))).tolist()
                 if n > 1 else [])
    cfg = dict(shards="x", min_frames=int(rng.integers(1, 6)), max_frames=int(rng.integers(8, 600)),
               min_frame_tokens=int(rng.integers(4, 80)), max_frame_tokens=int(rng.integers(80, 400)),
               video_tokens_per_second=float(rng.integers(10, 300)), min_video_tokens=1024,
               frame_jitter=float(rng.choice([0.0, 0.4])))
    cap = int(rng.integers(200, 40000)) if rng.random() < 0.5 else None
    return meta, cfg, cap


def _plan(meta, cfg, cap):
    try:
        return plan_frames(meta, VideoDataConfig(**cfg), seed=3, epoch=1, key="k", token_cap=cap)
    except PlanError as e:
        return (e.reason, e.detail)


def test_without_scene_data_the_plan_is_the_plan_without_fast_frames():
    """fast_frame_ratio > 0 on a video whose index has no scene changes (older shards) plans exactly what
    fast_frame_ratio 0 plans, and scene data with the ratio at 0 changes nothing either."""
    rng = np.random.default_rng(1)
    for _ in range(400):
        meta, cfg, cap = _random_case(rng)
        off = _plan(meta, cfg, cap)
        blind = {k: v for k, v in meta.items() if k != "scene_changes"}
        assert _plan(blind, {**cfg, "fast_frame_ratio": 0.3}, cap) == off
        assert _plan(blind, cfg, cap) == off


def test_slow_fast_plans_keep_the_budget_and_never_sample_fewer_frames():
    rng = np.random.default_rng(2)
    ratios = []
    for _ in range(400):
        meta, cfg, cap = _random_case(rng)
        off = _plan(meta, cfg, cap)
        fp = _plan(meta, {**cfg, "fast_frame_ratio": 0.3}, cap)
        if isinstance(fp, tuple):                     # what does not fit with fast frames did not fit without
            assert isinstance(off, tuple) and fp[0] == off[0] == "does_not_fit", (fp, off)
            continue
        assert fp.visual_tokens <= fp.budget, fp
        assert isinstance(off, tuple) or fp.num_frames >= off.num_frames, (fp, off)
        changes = set(meta["scene_changes"]["runs"] and np.concatenate(
            [a + b * np.arange(c) for a, b, c in meta["scene_changes"]["runs"]]).tolist())
        for k in range(fp.num_frames):               # the rule, on the plan's own frames
            moved = k == 0 or any(fp.indices[k - 1] < c <= fp.indices[k] for c in changes)
            assert fp.is_fast(k) == (not moved), (k, fp)
        if fp.num_fast:
            assert fp.fast_tokens_per_frame < fp.tokens_per_frame
            ratios.append(fp.fast_tokens_per_frame / fp.tokens_per_frame)
    # a fast frame gets at most 0.3 of a slow one's tokens unless no grid that small keeps the picture's aspect
    # ratio within 10% (snap_frame_size then takes the smallest that does: a tall or wide video's small frames)
    assert len(ratios) > 100 and np.mean(np.array(ratios) <= 0.3) > 0.8, (len(ratios), sorted(ratios)[-20:])


def test_a_long_still_video_gets_all_its_frames_where_slow_frames_alone_could_not():
    """An hour at 2 fps asks for 7,200 frames; Keye's 184K-token budget holds at most 2,880 frames at 64 tokens
    (2,792 of 66 tokens, the nearest 16:9 grid). With a scene change every 20 s, 180 frames are slow and the
    other 7,020 fast, so every asked-for frame fits."""
    cfg = dict(shards="x", max_frames=8192, min_frame_tokens=64, max_frame_tokens=256)
    meta = _meta(108_000, 30.0, 1080, 1920, changes=list(range(600, 108_000, 600)))
    off = plan_frames(meta, VideoDataConfig(**cfg))
    on = plan_frames(meta, VideoDataConfig(**cfg, fast_frame_ratio=0.3))
    assert off.budget == on.budget == 184_320
    assert off.num_frames == 184_320 // 66 and off.tokens_per_frame == 66 and not off.num_fast
    assert on.num_frames == 7200 and on.num_frames - on.num_fast == 180, (on.num_frames, on.num_fast)
    assert on.visual_tokens <= 184_320 and on.fast_tokens_per_frame <= 0.3 * on.tokens_per_frame
    assert on.tokens_per_frame > off.tokens_per_frame      # and the slow frames are larger


@pytest.mark.parametrize("layout", ["chw", "hwc"])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_decoders_scale_each_frame_to_its_own_size(tmp_path, backend, layout):
    pytest.importorskip("av" if backend == "pyav" else "decord")
    truth = write_video(tmp_path / "v.mp4", VideoSpec(n_frames=48, fps=12.0, width=320, height=180, scenes=4))
    meta = inspect_video(str(tmp_path / "v.mp4"))["video"]
    idx, fast = [3, 9, 15, 21, 27, 33, 40, 45], [False, True, False, True, True, False, True, True]
    req = DecodeRequest(path=str(tmp_path / "v.mp4"), indices=idx, height=168, width=308, meta=meta, layout=layout,
                        fast=fast, fast_height=84, fast_width=140)
    buf = decode_frames(backend, req)
    frames = frame_views(buf, frame_sizes(req), layout)
    hwc = [f if layout == "hwc" else f.transpose(1, 2, 0) for f in frames]
    assert [f.shape[:2] for f in hwc] == [(84, 140) if f else (168, 308) for f in fast]
    assert [read_counter(f, truth["counter_bits"]) for f in hwc] == idx          # frame i really is frame i
    # the slow frames are exactly what a request without fast frames decodes; PyAV's fast frames exactly what it
    # decodes at the fast size (swscale from the source straight to each size); decord's are shrunk (area mean,
    # shrink_planar) from the slow size, so only close to PyAV's at that size: a mean absolute difference under 2%
    # of the range (measured 1.1 and 2.0 grey levels: two filters, two roundings; a wrong frame differs by far more)
    slow = decode_frames(backend, dataclasses.replace(req, indices=[t for t, f in zip(idx, fast) if not f], fast=None))
    assert all(np.array_equal(a, b) for a, b in zip([f for f, q in zip(frames, fast) if not q], slow))
    small = decode_frames("pyav", dataclasses.replace(req, indices=[t for t, f in zip(idx, fast) if f], fast=None,
                                                      height=84, width=140))
    got = np.stack([f for f, q in zip(frames, fast) if q]).astype(np.int16)
    if backend == "pyav":
        assert np.array_equal(got, small)
    else:
        assert np.abs(got - small).mean() < 0.02 * 255, np.abs(got - small).mean()


def test_shrink_planar_is_an_area_average_when_halving():
    x = np.random.default_rng(0).integers(0, 256, size=(2, 3, 8, 12)).astype(np.uint8)
    want = x.reshape(2, 3, 4, 2, 6, 2).astype(np.float64).mean(axis=(3, 5))
    assert np.abs(shrink_planar(x, 4, 6).astype(np.float64) - want).max() <= 0.5 + 1e-9   # rounding only


@pytest.fixture(scope="module")
def scene_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    return make_synthetic_shards(out, 6, seed=3, scenes=3, min_seconds=3.0, max_seconds=4.0, shard_size_mb=0.08)


def _cfg(shards, tmp_path, **kw):
    return small_cfg(shards, tmp_path, seq_len=2048, min_frame_tokens=8, max_frame_tokens=64, max_frames=16,
                     video_tokens_per_second=48.0, **kw)


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_loader_packs_slow_and_fast_frames_frame_accurate(scene_shards, tmp_path, isolation):
    cfg = _cfg(scene_shards, tmp_path, fast_frame_ratio=0.3, num_epochs=1, decode_isolation=isolation)
    loader = VideoPackedLoader(cfg, seed=1)
    n_fast = n_frames = 0
    for p, d, rec, doc, mine, seg in documents(loader):
        fp = doc.frames
        bits = int(rec.annotation["counter_bits"])
        assert [read_counter(a, bits) for a in mine] == list(fp.indices), rec.key      # frame i really is frame i
        assert [a.shape[:2] for a in mine] == [fp.size(k) for k in range(fp.num_frames)], rec.key
        assert seg.count(" fast><vision_start>") == fp.num_fast, rec.key                # a fast frame says so
        assert seg.count("<video_pad>") == fp.visual_tokens
        n_fast += fp.num_fast
        n_frames += fp.num_frames
    assert 0 < n_fast < n_frames and loader.stats["samples_ok"] == 6, (n_fast, n_frames)
    # what the training log's data_fast_frame_share counts: the frames the documents carried, by their markers
    assert (loader.stats["frames_fast"], loader.stats["frames_video"]) == (n_fast, n_frames)


def test_slow_fast_resumes_exactly_and_names_its_setting(scene_shards, tmp_path):
    cfg = _cfg(scene_shards, tmp_path, fast_frame_ratio=0.3)
    assert_resumes_exactly(cfg, 4, 2, 3)
    a = VideoPackedLoader(cfg, seed=4)
    take(a, 1)
    assert a.state_dict()["plan_config"]["fast_frame_ratio"] == 0.3
    # off, the setting stays out of the fingerprint (a run keeps the state it saved before slow/fast existed)
    off = VideoPackedLoader(_cfg(scene_shards, tmp_path), seed=4)
    assert "fast_frame_ratio" not in off.state_dict()["plan_config"]
    with pytest.raises(ValueError, match="fast_frame_ratio"):
        off.load_state_dict(a.state_dict())


def test_frame_runs_shrink_only_the_fast_frames(scene_shards, tmp_path):
    loader = VideoPackedLoader(_cfg(scene_shards, tmp_path, fast_frame_ratio=0.3), seed=1)
    fp = next(d.frames for u in range(len(loader.catalog)) if (d := loader.planner.doc(u, 0)).frames.num_fast)
    x = np.random.default_rng(0).integers(0, 256, size=(fp.num_frames, 3, fp.height, fp.width)).astype(np.uint8)
    runs = frame_runs(x, fp)
    assert sum(r.shape[0] for r in runs) == fp.num_frames
    k = 0
    for r in runs:
        for a in r:
            if fp.is_fast(k):
                assert a.shape[1:] == (fp.fast_height, fp.fast_width)
                assert np.array_equal(a, shrink_planar(x[k:k + 1], fp.fast_height, fp.fast_width)[0])
            else:
                assert np.array_equal(a, x[k])
            k += 1
    # the single-process document (frames as HWC runs) holds the patches the loader writes from planar runs
    doc = next(d for u in range(len(loader.catalog)) if (d := loader.planner.doc(u, 0)).frames is fp)
    built = build_document(doc, frame_runs(x.transpose(0, 2, 3, 1), fp, "hwc"), loader.cfg, loader.tokenizer)
    want = np.concatenate([patchify(r, 14, 2, layout="chw") for r in runs])
    assert np.array_equal(built.pixels, want) and built.pixels.shape[0] == fp.patches(14)
    assert built.grid.tolist() == [[1, fp.size(k)[0] // 14, fp.size(k)[1] // 14] for k in range(fp.num_frames)]


def test_shards_without_scene_data_warn_and_plan_every_frame_slow(tmp_path, caplog):
    vids, ann = make_synthetic_videos(tmp_path, 2, seed=5, scenes=3, min_seconds=3.0, max_seconds=3.5)
    ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(tmp_path / "shards"), workers=1,
                         progress=False, scene_fps=0))
    assert all("scene_changes" not in r.video for r in load_catalog(str(tmp_path / "shards")))
    with caplog.at_level(logging.WARNING, logger="data.video.loader"):
        loader = VideoPackedLoader(_cfg(tmp_path / "shards", tmp_path, fast_frame_ratio=0.3), seed=1)
    assert "2 of 2 videos have no scene changes" in caplog.text and "Ingest them again" in caplog.text
    assert not any(loader.planner.doc(u, 0).frames.num_fast for u in range(2))


def test_bad_slow_fast_settings_stop_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ValueError, match="fast_frame_ratio"):
        VideoDataConfig(shards="x", fast_frame_ratio=1.0)
    with pytest.raises(ValueError, match="scene_similarity = 1.5"):
        IngestOptions(videos=str(tmp_path), out=str(tmp_path / "o"), scene_similarity=1.5)
    with pytest.raises(ValueError, match="scene_fps = -1"):
        IngestOptions(videos=str(tmp_path), out=str(tmp_path / "o"), scene_fps=-1)
    assert ingest_main(["--videos", str(tmp_path), "--out", str(tmp_path / "o"), "--scene-similarity", "0"]) == 2
    assert "scene_similarity = 0.0" in capsys.readouterr().err


@pytest.mark.parametrize("rotation", [0, 90])
def test_pyav_frames_are_those_of_a_fresh_scaler_for_every_frame(tmp_path, rotation):
    """decode_pyav scales every frame of a request with one swscale context (cheaper than a new one per frame, as
    `frame.reformat` makes): its pixels, slow and fast sizes alternating, in both layouts, must be exactly those of a
    plain PyAV loop over the whole stream that scales each wanted frame with a context of its own."""
    av = pytest.importorskip("av")
    path = str(tmp_path / "v.mp4")
    write_video(path, VideoSpec(n_frames=48, fps=12.0, width=320, height=180, rotation=rotation, scenes=4))
    meta = inspect_video(path)["video"]
    idx, fast = [2, 9, 10, 21, 27, 33, 40, 47], [False, True, True, False, True, False, True, False]
    H, W, fH, fW = 168, 308, 84, 140                 # display sizes; a 90-degree video is decoded at (W, H)
    ref = {"chw": [], "hwc": []}
    with av.open(path) as c:
        for i, fr in enumerate(c.decode(c.streams.video[0])):
            if i in idx:
                oh, ow = (fH, fW) if fast[idx.index(i)] else (H, W)
                dh, dw = (ow, oh) if rotation else (oh, ow)
                g = fr.reformat(width=dw, height=dh, format="gbrp")
                pl = [np.frombuffer(p, np.uint8).reshape(dh, p.line_size)[:, :dw] for p in g.planes]
                ref["chw"].append(np.rot90(np.stack((pl[2], pl[0], pl[1])), k=rotation // 90, axes=(1, 2)))
                ref["hwc"].append(np.rot90(fr.to_ndarray(width=dw, height=dh, format="rgb24"), k=rotation // 90))
    assert meta["rotation"] == rotation and (meta["width"], meta["height"]) == (320, 180)
    assert len(ref["chw"]) == len(idx)
    for layout in ("chw", "hwc"):
        req = DecodeRequest(path=path, indices=idx, height=H, width=W, meta=meta, layout=layout, fast=fast,
                            fast_height=fH, fast_width=fW)
        got = frame_views(decode_frames("pyav", req), frame_sizes(req), layout)
        assert [g.shape for g in got] == [r.shape for r in ref[layout]]
        assert all(np.array_equal(g, r) for g, r in zip(got, ref[layout])), layout
