"""Decoding once per replica (parallel.vit.decode_once, docs/data.md "Decoding once per replica"): a loader without
pixels builds the packs of the rank that decodes them, every tensor but the pixels, and counts them alike, also where
that rank failed to decode a sample; `VideoBatchStream.settle` carries those failures (or that rank's error) to the
other ranks of the replica.

Reference: the decoding rank's own loader (today's path, which decodes every sample); the broadcast of settle is
played between two in-process streams (what torch.distributed.broadcast_object_list would deliver).
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


class _Broadcast:
    """torch.distributed.broadcast_object_list between two in-process streams: the decoding rank's settle runs
    first and leaves its message for the other's."""

    def __init__(self):
        self.sent = None

    def __call__(self, msg, src, group=None):
        if msg[0] is not None:
            self.sent = list(msg)
        else:
            msg[:] = self.sent


def _streams(cfg, follower_cfg, monkeypatch):
    import torch.distributed as dist

    from data.video_stream import DecodeOnce, VideoBatchStream

    monkeypatch.setattr(dist, "broadcast_object_list", _Broadcast())
    kw = dict(seq_length=cfg.seq_len, micro_batch_size=1, global_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    return (VideoBatchStream(cfg, decode_once=DecodeOnce(group=None, src=0, decodes=True), **kw),
            VideoBatchStream(follower_cfg, decode_once=DecodeOnce(group=None, src=0, decodes=False), **kw),
            VideoBatchStream(replace(cfg, quarantine_path=""), **kw))      # today's: every rank decodes


# num_workers=3 (a real run's recipe has 4): the packs come from the DataLoader workers in turn, on each rank its own
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")   # 3 workers on a 2-core machine
@pytest.mark.parametrize("workers", [0, 3])
def test_settle_gives_every_rank_the_decoding_ranks_micro_batches(shard_dir, tmp_path, monkeypatch, workers):
    cfg, follower_cfg = _cfgs(shard_dir, tmp_path, num_epochs=None,     # packs without end: 3 steps of 2
                              num_workers=workers)
    decoder, follower, each = _streams(cfg, follower_cfg, monkeypatch)
    for _ in range(3):
        a = decoder.settle(decoder.take(2))
        b = follower.settle(follower.take(2))
        c = [next(each) for _ in range(2)]
        for x, y, z in zip(a, b, c):
            assert y["pixel_values"].shape[0] == 0 and torch.equal(x["pixel_values"], z["pixel_values"])
            for k in x:
                if k != "pixel_values":
                    assert torch.equal(x[k], y[k]) and torch.equal(x[k], z[k]), k
    assert decoder.describe_step() == follower.describe_step() == each.describe_step()
    assert follower.stats == decoder.stats == each.stats and decoder.stats["samples_failed"] >= 1
    assert follower.step_metrics().get("data_frames_decoded") is None     # this rank decoded nothing
    assert decoder.step_metrics()["data_frames_decoded"] == decoder.stats["frames_video"]


def test_an_error_of_the_decoding_rank_is_raised_on_every_rank(shard_dir, tmp_path, monkeypatch):
    import torch.distributed as dist

    cfg, follower_cfg = _cfgs(shard_dir, tmp_path, max_consecutive_failures=1, num_epochs=None)
    decoder, follower, _ = _streams(cfg, follower_cfg, monkeypatch)
    # a failed sample with max_consecutive_failures=1: both ranks raise in settle (the follower learns of it there)
    with pytest.raises(RuntimeError, match="consecutive samples failed"):
        for _ in range(8):
            decoder.settle(decoder.take(1))
    with pytest.raises(RuntimeError, match="consecutive samples failed"):
        for _ in range(8):
            follower.settle(follower.take(1))

    decoder, follower, _ = _streams(cfg, follower_cfg, monkeypatch)

    def gone():
        raise RuntimeError("video loader: shard x.tar is gone")
    monkeypatch.setattr(decoder.loader, "draw", gone)
    packs = decoder.take(2)        # kept for settle, which the other ranks of the replica wait in
    with pytest.raises(RuntimeError, match="is gone"):
        decoder.settle(packs)
    with pytest.raises(RuntimeError, match="decoding rank 0 .*decode_once.* failed: RuntimeError: video loader: "
                                           "shard x.tar is gone"):
        follower.settle(follower.take(2))

    # an error every rank meets (the data's, not a decode's): each raises its own, after the broadcast
    broadcast = dist.broadcast_object_list
    calls = []
    monkeypatch.setattr(dist, "broadcast_object_list", lambda msg, src, group=None: (calls.append(1),
                                                                                      broadcast(msg, src, group)))
    monkeypatch.setattr(follower.loader, "draw", gone)
    packs = decoder.take(1), follower.take(1)
    for stream, got in zip((decoder, follower), packs):
        with pytest.raises(RuntimeError, match="^video loader: shard x.tar is gone$"):
            stream.settle(got)
    assert len(calls) == 2


def _twin_shards(shard_dir, tmp_path):
    """Two shard folders, each with a shard-000000.tar holding samples "clip" and "other": folder a's decode, folder
    b's "clip" is a broken file (the metadata of a good video)."""
    from data.video.shards import ShardWriter, load_catalog
    from data.video.synthetic import make_bad_videos

    donor = load_catalog(str(shard_dir))[0]
    good = tmp_path / "good.mp4"
    good.write_bytes(open(donor.shard, "rb").read()[donor.video_offset:donor.video_offset + donor.video_size])
    bad = make_bad_videos(tmp_path / "bad_src", seed=1)["truncated_in_middle.mp4"]["path"]
    meta = {"video": donor.video, "annotation": donor.annotation}
    for folder, clip in (("a", good), ("b", bad)):
        (tmp_path / folder).mkdir()
        w = ShardWriter(tmp_path / folder, 0)
        w.add_sample("clip", str(clip), "mp4", meta)
        w.add_sample("other", str(good), "mp4", meta)
        w.close()
    return f"{tmp_path / 'a'},{tmp_path / 'b'}"


def test_a_failed_sample_is_told_apart_from_its_namesake_in_another_shard_folder(shard_dir, tmp_path):
    """data.video.shards naming two folders that both hold shard-000000.tar with a sample "clip" (two ingests): when
    one of the two fails, the other stays in the pack, on the decoding rank and in the pack the others rebuild, and
    one failure is counted."""
    cfg = small_cfg(_twin_shards(shard_dir, tmp_path), tmp_path, shuffle=False, num_epochs=1, seq_len=2048,
                    decode_isolation="inline", decode_backend="pyav")
    decoder = VideoPackedLoader(cfg, seed=0)
    follower = VideoPackedLoader(replace(cfg, quarantine_path=""), seed=0, pixels=False)
    p = decoder.draw()
    assert p.planned_keys.count("shard-000000.tar/clip") == 2, p.planned_keys    # both in the one pack
    q = follower.rebuild(follower.draw(), p.failures)
    decoder.account(p)
    follower.account(q)
    assert [f["key"] for f in p.failures] == ["clip"] and p.sample_keys.count("shard-000000.tar/clip") == 1
    for f in SAME:
        assert torch.equal(getattr(p, f), getattr(q, f)), f
    assert q.sample_keys == p.sample_keys and q.failures == p.failures
    assert decoder.stats["samples_failed"] == follower.stats["samples_failed"] == 1
    assert decoder.stats["samples_ok"] == follower.stats["samples_ok"] == 3
    assert [(r["shard"], r["key"]) for r in read_jsonl(cfg.quarantine_path)] == [("shard-000000.tar", "clip")]
