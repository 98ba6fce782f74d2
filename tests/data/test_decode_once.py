"""Decoding once per replica (parallel.vit.decode_once, docs/data.md "Decoding once per replica"): a loader without
pixels builds the packs of the rank that decodes them, every tensor but the pixels, and counts them alike, also where
that rank failed to decode a sample.

Reference: the decoding rank's own loader (today's path, which decodes every sample).
"""
from dataclasses import replace

import pytest
import torch

from data.video.loader import VideoPackedLoader
from data.video.packing import PackedSample

from .conftest import read_jsonl, small_cfg
from .test_bad_samples import BAD, _broken_shards

BAD3 = BAD[:3]
SAME = [f for f in PackedSample._TENSORS if f != "pixel_values"]


def _cfgs(shard_dir, tmp_path, **kw):
    d = _broken_shards(shard_dir, tmp_path / "s", n_good=4, bad=BAD3)
    cfg = small_cfg(d, tmp_path, **{**dict(shuffle=True, shuffle_buffer=8, num_epochs=1, seq_len=512,
                                           decode_isolation="inline", decode_backend="pyav"), **kw})
    return cfg, replace(cfg, quarantine_path="")     # a follower writes no quarantine record (not its replica's first)


def test_a_loader_without_pixels_builds_the_decoding_ranks_packs(shard_dir, tmp_path):
    cfg, follower_cfg = _cfgs(shard_dir, tmp_path)
    decoder = VideoPackedLoader(cfg, seed=0)
    follower = VideoPackedLoader(follower_cfg, seed=0, pixels=False)
    rebuilt = 0
    for _ in range(50):
        try:
            p = decoder.draw()
        except StopIteration:
            with pytest.raises(StopIteration):
                follower.draw()
            break
        q = follower.draw()
        assert q.pixel_values.shape == (0, p.pixel_values.shape[1]) and q.failures == []
        if p.failures:                 # the follower cannot know: its pack holds the failed sample's tokens
            assert q.tokens.shape != p.tokens.shape or not torch.equal(q.tokens, p.tokens)
            rebuilt += 1
        q = follower.rebuild(q, p.failures)
        decoder.account(p)
        follower.account(q)
        for f in SAME:
            assert torch.equal(getattr(p, f), getattr(q, f)), (p.pack_index, f)
        assert (q.sample_keys, q.failures, q.planned_keys, q.video_frames, q.num_pad) == \
            (p.sample_keys, p.failures, p.planned_keys, p.video_frames, p.num_pad)
        assert p.pixel_values.shape[0] == int(p.grid_thw.prod(-1).sum())
    assert rebuilt >= 1, "no pack with a failed sample: the test would not exercise rebuild"
    assert follower.stats == decoder.stats and decoder.stats["samples_failed"] == len(BAD3)
    assert follower.state_dict() == decoder.state_dict()        # resume: the same position and counters
    assert follower.decode_stats == {"frames": 0, "images": 0, "seconds": 0.0}
    assert decoder.decode_stats["frames"] == decoder.stats["frames_video"] > 0
    assert sorted(r["key"] for r in read_jsonl(cfg.quarantine_path)) == sorted(
        "bad_" + b.split(".")[0] for b in BAD3)
