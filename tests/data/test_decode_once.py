"""Decoding once per replica (parallel.vit.decode_once, docs/data.md "Decoding once per replica"): a loader without
pixels builds the packs of the rank that decodes them, every tensor but the pixels, and counts them alike, also where
that rank failed to decode a sample; `VideoBatchStream.settle` carries those failures (or that rank's error) to the
other ranks of the replica.

Reference: the decoding rank's own loader (today's path, which decodes every sample); the all_gather of settle is
played between in-process streams, each in a thread (what torch.distributed.all_gather_object delivers).
"""
import re
import threading
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


class _Replica:
    """torch.distributed.all_gather_object among in-process streams (ranks 0..n-1 of a replica), each settling in a
    thread of its own: every call waits for the others' messages, as the processes of a replica do. A rank that never
    comes leaves the others waiting: the barrier's timeout raises BrokenBarrierError there."""

    def __init__(self, n: int, timeout: float = 20.0):
        self.n, self.barrier, self.msgs, self.calls = n, threading.Barrier(n, timeout=timeout), {}, 0

    def all_gather_object(self, out, obj, group=None):
        self.calls += 1
        self.msgs[obj["rank"]] = obj
        self.barrier.wait()
        out[:] = [self.msgs[r] for r in range(self.n)]
        self.barrier.wait()                 # every rank has read this round's messages before the next round's come

    def settle(self, streams, n: int) -> list:
        """Each stream's settle(take(n)), settle in a thread of its own (take is the rank's alone): its micro-batches,
        or the exception it raised."""
        got = [None] * len(streams)
        packs = [s.take(n) for s in streams]

        def run(i):
            try:
                got[i] = streams[i].settle(packs[i])
            except Exception as e:
                got[i] = e
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(streams))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return got


def _streams(cfg, follower_cfgs, monkeypatch, pixels=None):
    """A replica of 1 + len(follower_cfgs) ranks under decode_once (rank 0 decodes; with `pixels`, a bool per rank,
    those ranks too), played in threads (_Replica), and today's stream where this rank decodes every pack (the
    reference)."""
    import torch.distributed as dist

    from data.video_stream import DecodeOnce, VideoBatchStream

    replica = _Replica(1 + len(follower_cfgs))
    monkeypatch.setattr(dist, "all_gather_object", replica.all_gather_object)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: replica.n)
    kw = dict(seq_length=cfg.seq_len, micro_batch_size=1, global_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    pixels = pixels or [r == 0 for r in range(replica.n)]
    ranks = [VideoBatchStream(c, decode_once=DecodeOnce(group=None, src=0, rank=r, pixels=pixels[r]), **kw)
             for r, c in enumerate([cfg, *follower_cfgs])]
    return replica, ranks, VideoBatchStream(replace(cfg, quarantine_path=""), **kw)


# num_workers=3 (a real run's recipe has 4): the packs come from the DataLoader workers in turn, on each rank its own
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")   # 3 workers on a 2-core machine
@pytest.mark.parametrize("workers", [0, 3])
def test_settle_gives_every_rank_the_decoding_ranks_micro_batches(shard_dir, tmp_path, monkeypatch, workers):
    cfg, follower_cfg = _cfgs(shard_dir, tmp_path, num_epochs=None,     # packs without end: 3 steps of 2
                              num_workers=workers)
    replica, (decoder, follower), each = _streams(cfg, [follower_cfg], monkeypatch)
    for _ in range(3):
        a, b = replica.settle([decoder, follower], 2)
        c = [next(each) for _ in range(2)]
        for x, y, z in zip(a, b, c):
            assert y["pixel_values"].shape[0] == 0 and torch.equal(x["pixel_values"], z["pixel_values"])
            for k in x:
                if k != "pixel_values":
                    assert torch.equal(x[k], y[k]) and torch.equal(x[k], z[k]), k
    assert replica.calls == 2 * 3          # one collective per rank and round
    assert decoder.describe_step() == follower.describe_step() == each.describe_step()
    assert follower.stats == decoder.stats == each.stats and decoder.stats["samples_failed"] >= 1
    assert follower.step_metrics().get("data_frames_decoded") is None     # this rank decoded nothing
    assert decoder.step_metrics()["data_frames_decoded"] == decoder.stats["frames_video"]


def _gone(what: str):
    def draw():
        raise RuntimeError(f"video loader: {what}")
    return draw


def test_ranks_that_encode_no_frame_load_no_pixels_under_the_replicated_layout(shard_dir, tmp_path, monkeypatch):
    """parallel.vit.layout=replicated with pipeline stages: each LM-input rank (stage 0: ranks 0 and 1, as of TP2)
    encodes every frame itself and decodes the packs, the later stage (rank 2) encodes none and used to decode every
    pack for nothing. It now builds them without pixels from the decoding rank's failures: every tensor but the pixels
    and every counter are today's."""
    cfg, follower_cfg = _cfgs(shard_dir, tmp_path, num_epochs=None)
    replica, streams, each = _streams(cfg, [follower_cfg, follower_cfg], monkeypatch, pixels=[True, True, False])
    for _ in range(3):
        got = replica.settle(streams, 2)
        ref = [next(each) for _ in range(2)]
        for r, mbs in enumerate(got):
            for x, z in zip(mbs, ref):
                for k in x:
                    assert (x[k].shape[0] == 0 if k == "pixel_values" and r == 2 else torch.equal(x[k], z[k])), (r, k)
    assert [s.stats for s in streams] == [each.stats] * 3 and each.stats["samples_failed"] >= 1
    assert streams[2].loader.decode_stats["frames"] == 0
    assert streams[0].loader.decode_stats["frames"] == streams[1].loader.decode_stats["frames"] > 0

    # a decode that fails on one of the decoding ranks alone (its timeout): their sequences would differ
    draw = streams[1].loader.draw

    def one_more_failure():
        p = draw()
        p.failures = [*p.failures, {"shard": "s.tar", "key": "k", "reason": "timeout", "detail": "", "slot": 0}]
        return p
    monkeypatch.setattr(streams[1].loader, "draw", one_more_failure)
    got = replica.settle(streams, 1)
    assert all(isinstance(g, RuntimeError) and str(g) == str(got[0]) for g in got), got
    assert re.match(r"video loader: rank 1 and the replica's decoding rank 0 decode their packs each, and failed on "
                    r"other samples of epoch \d+ pack \d+: ", str(got[0])), got[0]


def test_an_error_of_the_decoding_rank_is_raised_on_every_rank(shard_dir, tmp_path, monkeypatch):
    cfg, follower_cfg = _cfgs(shard_dir, tmp_path, max_consecutive_failures=1, num_epochs=None)
    replica, streams, _ = _streams(cfg, [follower_cfg], monkeypatch)
    # a failed sample with max_consecutive_failures=1: both ranks raise in settle (the follower learns of it there)
    for _ in range(8):
        got = replica.settle(streams, 1)
        if any(isinstance(g, Exception) for g in got):
            break
    assert all(isinstance(g, RuntimeError) and "consecutive samples failed" in str(g) for g in got), got

    replica, (decoder, follower), _ = _streams(cfg, [follower_cfg], monkeypatch)
    monkeypatch.setattr(decoder.loader, "draw", _gone("shard x.tar is gone"))
    mine, theirs = replica.settle([decoder, follower], 2)
    assert str(mine) == "video loader: shard x.tar is gone"        # its own, and the others':
    assert re.fullmatch(r"video loader: the replica's decoding rank 0 failed \(.*\): "
                        r"RuntimeError: video loader: shard x.tar is gone", str(theirs)), theirs

    # an error every rank meets (the data's, not a decode's): each raises its own, after the exchange
    monkeypatch.setattr(follower.loader, "draw", _gone("shard x.tar is gone"))
    got = replica.settle([decoder, follower], 1)
    assert [str(g) for g in got] == ["video loader: shard x.tar is gone"] * 2, got


def test_an_error_of_another_rank_stops_every_rank_of_the_replica(shard_dir, tmp_path, monkeypatch):
    """A rank that does not decode meets an error of its own (its loader worker died, a token file of a mixture is
    corrupt on its node): it raised it after the round's broadcast, while the decoding rank went on to the vision
    phase and waited in its all_to_all until the job was killed. Now every rank stops in the same settle, with the
    failing rank's error named (3 ranks: the other follower says the same)."""
    cfg, follower_cfg = _cfgs(shard_dir, tmp_path, num_epochs=None)
    replica, streams, _ = _streams(cfg, [follower_cfg, follower_cfg], monkeypatch)
    assert all(isinstance(g, list) for g in replica.settle(streams, 1))       # a good round first
    monkeypatch.setattr(streams[2].loader, "draw", _gone("token file t.bin is corrupt"))
    got = replica.settle(streams, 1)
    assert str(got[2]) == "video loader: token file t.bin is corrupt", got
    for g in got[:2]:
        assert isinstance(g, RuntimeError) and str(g) == (
            "video loader: the replica's rank 2 failed (its ranks settle each round's packs together: docs/data.md "
            "\"Decoding once per replica\"): RuntimeError: video loader: token file t.bin is corrupt"), got


def test_packs_that_are_not_the_decoding_ranks_stop_every_rank(shard_dir, tmp_path, monkeypatch):
    """A rank whose node holds other data (a shard missing from its copy) plans other packs than the decoding rank:
    it trained on other tokens than its tensor ranks, with frames that are not the decoding rank's. Every rank now
    stops in settle, naming the rank, the pack and the setting."""
    cfg, follower_cfg = _cfgs(shard_dir, tmp_path, num_epochs=None)
    d = _broken_shards(shard_dir, tmp_path / "fewer", n_good=3, bad=BAD3)       # one good video fewer
    replica, streams, _ = _streams(cfg, [replace(follower_cfg, shards=str(d))], monkeypatch)
    got = replica.settle(streams, 2)
    assert all(isinstance(g, RuntimeError) for g in got) and str(got[0]) == str(got[1]), got
    assert re.fullmatch(r"video loader: the ranks of a data-parallel replica .* but rank 1 drew other packs than its "
                        r"decoding rank 0: rank 1 drew epoch 0 pack \d+( with other samples)? where it drew epoch 0 "
                        r"pack \d+\. .*data.video.shards.*", str(got[0])), got[0]


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
    # both in the one pack, each named with its folder (data/video/shards.shard_names)
    assert {"a/shard-000000.tar/clip", "b/shard-000000.tar/clip"} <= set(p.planned_keys), p.planned_keys
    q = follower.rebuild(follower.draw(), p.failures)
    decoder.account(p)
    follower.account(q)
    assert [(f["shard"], f["key"]) for f in p.failures] == [("b/shard-000000.tar", "clip")]
    assert "a/shard-000000.tar/clip" in p.sample_keys and "b/shard-000000.tar/clip" not in p.sample_keys
    for f in SAME:
        assert torch.equal(getattr(p, f), getattr(q, f)), f
    assert q.sample_keys == p.sample_keys and q.failures == p.failures
    assert decoder.stats["samples_failed"] == follower.stats["samples_failed"] == 1
    assert decoder.stats["samples_ok"] == follower.stats["samples_ok"] == 3
    assert [(r["shard"], r["key"]) for r in read_jsonl(cfg.quarantine_path)] == [("b/shard-000000.tar", "clip")]


@pytest.mark.parametrize("layout,decode_once,members,consumers,kind,want", [
    ("spread", None, [4, 5], [0, 1], "video", [4]),                  # TP2: the replica's first rank decodes
    ("spread", False, [4, 5], [0, 1], "video", [4, 5]),             # each decodes, and settles with the first
    ("spread", None, [3], [0], "video", None),                       # a replica of one rank
    ("replicated", None, [0, 2, 4, 6], [0, 1], "video", [0, 2]),     # TP2 x PP2: the LM-input ranks of stage 0
    ("replicated", None, [0, 1], [0, 1], "video", [0, 1]),           # TP2: every rank encodes every frame
    ("spread", True, [0, 1], [0, 1], "tokens", None),
])
def test_who_loads_pixels(layout, decode_once, members, consumers, kind, want):
    from parallel.layout import ViTParallelConfig
    from train.vision import pixel_ranks

    assert pixel_ranks(ViTParallelConfig(layout=layout, decode_once=decode_once), kind, members, consumers) == want


def test_an_error_of_the_decoding_rank_in_its_accounting_stops_every_rank(shard_dir, tmp_path, monkeypatch):
    """The decoding rank writes the replica's quarantine records as it accounts a round's packs. That write failing
    (a full disk) raised on that rank alone after the round's exchange, while the other ranks took their micro-batches
    on to the vision phase and waited in scatter_pixels for pixels that never came, until the job was killed. The
    decoding rank now accounts its packs before the exchange: every rank stops in the same settle, naming it."""
    cfg, follower_cfg = _cfgs(shard_dir, tmp_path, num_epochs=None)
    replica, (decoder, follower), _ = _streams(cfg, [follower_cfg], monkeypatch)

    def full_disk(rec):
        raise OSError(28, "No space left on device", cfg.quarantine_path)
    monkeypatch.setattr(decoder.loader, "_quarantine", full_disk)
    for _ in range(8):     # until a round holds a failed sample (its record is written as the pack is accounted)
        got = replica.settle([decoder, follower], 1)
        if any(isinstance(g, Exception) for g in got):
            break
    mine, theirs = got
    assert isinstance(mine, OSError) and "No space left on device" in str(mine), got
    assert isinstance(theirs, RuntimeError) and str(theirs) == (
        "video loader: the replica's decoding rank 0 failed (its ranks settle each round's packs together: "
        f"docs/data.md \"Decoding once per replica\"): OSError: {mine}"), got


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_a_dead_worker_of_the_decoding_rank_stops_every_rank_in_the_next_settle(shard_dir, tmp_path, monkeypatch):
    """torch's SIGCHLD handler raised a DataLoader worker's death in the main thread wherever it was: on the
    decoding rank, after a round's exchange, that rank stopped alone while the others waited in scatter_pixels
    for its pixels until the job was killed. A death outside a draw is now kept and raised by the next draw, inside
    `take`: it travels in that round's exchange, and every rank stops there naming the decoding rank."""
    import os
    import signal
    import time

    cfg, follower_cfg = _cfgs(shard_dir, tmp_path, num_epochs=None, num_workers=1)
    replica, (decoder, follower), _ = _streams(cfg, [replace(follower_cfg, num_workers=0)], monkeypatch)
    assert all(isinstance(g, list) for g in replica.settle([decoder, follower], 1))    # a good round first
    (worker,) = decoder.loader._it._workers
    os.kill(worker.pid, signal.SIGKILL)     # the OOM killer, after the exchange
    deadline = time.time() + 1.0    # the handler runs in the main thread (this one) as the signal arrives
    while time.time() < deadline:
        time.sleep(0.05)
    mine, theirs = replica.settle([decoder, follower], 1)
    assert isinstance(mine, RuntimeError) and re.match(r"DataLoader worker \(pid \d+\) is killed by signal: Killed",
                                                      str(mine)), mine
    assert isinstance(theirs, RuntimeError) and str(theirs).startswith(
        "video loader: the replica's decoding rank 0 failed (its ranks settle each round's packs together: "
        f"docs/data.md \"Decoding once per replica\"): RuntimeError: {mine}"), theirs


@pytest.mark.parametrize("layout,decode_once", [("replicated", None), ("spread", False)])
def test_ranks_that_decode_each_stop_together_on_a_decode_that_failed_on_one(shard_dir, tmp_path, monkeypatch, layout,
                                                                              decode_once):
    """A TP2 replica without pipeline stages under parallel.vit.layout=replicated (or spread with decode_once=false):
    both ranks decode every pack, and nothing compared them. A sample whose decode failed on one rank alone (its
    sample_timeout_s on a loaded node) was left out there and kept on its tensor peer: the two trained on other tokens
    of one sequence. The streams, built as the trainer builds them (Trainer._decode_once from pixel_ranks), now settle
    each round with the replica's first rank, and both stop naming the two ranks and the sample."""
    from data.video import loader as vl
    from data.video_stream import DecodeOnce, VideoBatchStream
    from parallel.layout import ViTParallelConfig
    from train.vision import pixel_ranks

    cfg, follower_cfg = _cfgs(shard_dir, tmp_path, num_epochs=None)
    replica = _Replica(2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", replica.all_gather_object)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: replica.n)
    decoding = pixel_ranks(ViTParallelConfig(layout=layout, decode_once=decode_once), "video", [0, 1], [0, 1])
    kw = dict(seq_length=cfg.seq_len, micro_batch_size=1, global_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    streams = [VideoBatchStream(c, decode_once=None if decoding is None else
                                DecodeOnce(group=None, src=0, rank=r, pixels=r in decoding), **kw)
               for r, c in enumerate([cfg, follower_cfg])]
    a, b = replica.settle(streams, 1)        # a round where both decode alike
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])

    # rank 1's decode of its pack's first video or image times out (rank 0 decodes it)
    write, failing = vl._write_patches, [False]

    def write_patches(*args):
        if failing[0]:
            failing[0] = False
            raise vl.SampleFailure("timeout", "no frames within data.video.sample_timeout_s")
        return write(*args)
    monkeypatch.setattr(vl, "_write_patches", write_patches)
    draw = streams[1].loader.draw

    def draw_failing():
        failing[0] = True
        return draw()
    monkeypatch.setattr(streams[1].loader, "draw", draw_failing)
    got = replica.settle(streams, 1)
    assert not failing[0], "the pack held no video or image: the fault was not injected"
    assert all(isinstance(g, RuntimeError) for g in got), (
        f"the ranks went on with other sequences: {int((got[0][0]['tokens'] != got[1][0]['tokens']).sum())} of "
        f"{got[0][0]['tokens'].numel()} tokens differ"
        if all(isinstance(g, list) for g in got) else got)
    assert str(got[0]) == str(got[1]) and re.fullmatch(
        r"video loader: rank 1 and the replica's decoding rank 0 decode their packs each, and failed on other samples "
        r"of epoch \d+ pack \d+: \S+ against none, so their sequences would differ \(.*\)", str(got[0])), got[0]
    assert replica.calls == 2 * 2          # one collective per rank and round


def test_an_error_between_settle_and_the_pixel_exchange_goes_to_the_vision_phase(monkeypatch):
    """Under decode_once, an error of one rank after settle's exchange (rebuilding a pack) or before the pixels move
    (an out-of-memory copying them to the device) was raised there, on that rank alone, while the others waited in
    scatter_pixels until the job's timeout. The trainer's round and the tower now hand it to the vision phase, which
    raises it on every rank of the group before the all_to_all (tests/dist/test_vit_layout.py pixels_from_0_faults).
    Fakes stand for the stream, the tower's phase and the micro-batches."""
    from types import SimpleNamespace

    from train.trainer import Trainer
    from train.vision import VisionTower

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    calls = []

    class Phase:
        def forward(self, mbs, needs, **kw):
            calls.append((mbs, kw))

    class Pixels:            # a micro-batch's pixels whose copy to the device runs out of memory
        def to(self, *a, **k):
            raise oom
    tower = SimpleNamespace(decode_once=True, meets=True, phase=Phase(), bf16=False, layout=SimpleNamespace(cp=1))
    tower._inputs = lambda mbs, device: VisionTower._inputs(tower, mbs, device)
    VisionTower.forward(tower, [{"pixel_values": Pixels(), "grid_thw": torch.ones(1, 3, dtype=torch.long)}], "cpu")
    assert calls == [([], {"pixels_from": 0, "error": oom})]

    gone = MemoryError("rebuilding a pack")
    stream = SimpleNamespace(take=lambda n: [], settle=lambda mbs: (_ for _ in ()).throw(gone))
    vision = SimpleNamespace(decode_once=True, meets=True,
                             forward=lambda mbs, device, error=None: calls.append((mbs, error)))
    trainer = SimpleNamespace(step=0, rank=1, data_can_end=False, vision=vision, device="cpu")
    Trainer._video_round(trainer, stream, 1)
    assert calls[-1] == ([], gone)


def test_an_error_after_settle_goes_to_the_replicated_layouts_phase(monkeypatch):
    """Under parallel.vit.layout=replicated with pipeline stages (no decode_once), an error of one rank after the
    round's settle (a later stage rebuilding a pack) or copying its pixels to the device was raised there alone, while
    the other stage waited in the LM's first pipeline send until the job's timeout. The tower of a group of several
    ranks now meets (`meets`), and its round and forward hand the error to the replicated phase, which raises it on
    every rank of the group (tests/dist/test_vit_layout.py replicated_pp2_faults). Fakes stand for the config, the
    process group, the stream and the phase."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from train import vision as tv
    from train.trainer import Trainer
    from train.vision import VisionTower

    calls = []

    class Phase:
        def forward(self, mbs, needs, **kw):
            calls.append((mbs, kw))
    # a tower of the replicated layout over a group of 2 (PP2: rank 0 stage 0, rank 1 the later stage), built by its
    # own __init__ with the process group's calls and the phase faked
    monkeypatch.setattr(tv, "sequence_group", lambda layout, pgs: "group")
    monkeypatch.setattr(tv, "build_vision_phase", lambda *a, **k: Phase())
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda group: [0, 1])
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    from train.config import Config
    cfg = Config()
    cfg.model.vision.enabled, cfg.data.kind = True, "video"
    v = cfg.model.vision                            # a tiny tower: building the 400M-parameter default takes seconds
    v.depth, v.hidden, v.heads, v.mlp, v.pos_grid = 1, 16, 2, 32, 4
    cfg.parallel.vit.layout = "replicated"
    layout = SimpleNamespace(tp=1, cp=1, dp=1, pp=2)
    tower = VisionTower(cfg, layout, None, torch.device("cpu"), train_vit=True, bf16=False)
    assert (tower.decode_once, tower.pixel_ranks) == (False, [0])

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    class Pixels:            # a micro-batch's pixels whose copy to the device runs out of memory
        def to(self, *a, **k):
            raise oom
    tower.forward([{"pixel_values": Pixels(), "grid_thw": torch.ones(1, 3, dtype=torch.long)}], "cpu")
    assert calls == [([], {"error": oom})]

    gone = RuntimeError("rebuilding a pack")
    stream = SimpleNamespace(take=lambda n: [], settle=lambda mbs: (_ for _ in ()).throw(gone))
    trainer = SimpleNamespace(step=0, rank=1, data_can_end=False, vision=tower, device="cpu")
    Trainer._video_round(trainer, stream, 1)
    assert calls[-1] == ([], {"error": gone})
    assert tower.meets
