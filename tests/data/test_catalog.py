"""The columnar catalog and the epoch plans kept as files a node's processes map (VideoDataConfig.index_dir).

References independent of the code under test: the shard index files read here as JSON (for the catalog's records
and its fingerprint), the old planning loop written out here (every document planned in epoch order, then
packing.pack_greedy), and a loader without index_dir (for the packs, the plans and an exact resume)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import pytest

from data.video import loader as loader_mod
from data.video import shards as shards_mod
from data.video.ingest import IngestOptions, ingest
from data.video.loader import Planner, VideoPackedLoader
from data.video.packing import pack_greedy
from data.video.sampling import PlanError
from data.video.shards import Catalog, index_path, load_catalog, resolve_shards
from data.video.synthetic import make_synthetic_videos, text_record

from .conftest import is_mapped, small_cfg
from .test_loader import assert_resumes_exactly, signature, take


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """4 videos, 3 single images and 1 set of images, 10 texts (4 of them long enough to need several 256-token
    sequences), and a broken record planning rejects (a video whose metadata lost its frame count)."""
    out = tmp_path_factory.mktemp("kinds")
    vids, ann = make_synthetic_videos(out, 4, seed=5, max_seconds=2.0, n_images=3, n_text=6, n_image_sets=1)
    with open(ann, "a") as f:
        for i in range(4):
            rec = text_record(100 + i, 5)
            rec["text"] = " ".join([rec.get("text") or "long text"] * 12)
            f.write(json.dumps(rec) + "\n")
    ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(out / "shards"), shard_size_mb=0.03,
                         workers=1, progress=False))
    shards = out / "shards"
    first = resolve_shards(str(shards))[0]       # one video's metadata spoiled in the index: planning rejects it
    idx = json.loads(open(index_path(first)).read())
    victim = next(s for s in idx["samples"] if s["video"] is not None)
    victim["video"].pop("num_frames")
    open(index_path(first), "w").write(json.dumps(idx))
    return shards


def _index_samples(shards) -> list[tuple[str, dict]]:
    return [(tar, s) for tar in resolve_shards(str(shards)) for s in json.load(open(index_path(tar)))["samples"]]


def test_catalog_holds_each_shard_index_record(kinds, tmp_path):
    want = _index_samples(kinds)
    names = hashlib.sha1("".join(f"{os.path.basename(t)}/{s['key']}\n" for t, s in want).encode()).hexdigest()[:16]
    for cat in (load_catalog(str(kinds)), load_catalog(str(kinds), index_dir=tmp_path / "ix")):
        assert len(cat) == len(want) and cat.fingerprint == names
        for uid, (r, (tar, s)) in enumerate(zip(cat, want)):
            assert (r.uid, r.shard, r.key, r.video_offset, r.video_size) == (uid, tar, s["key"], s["video_offset"],
                                                                             s["video_size"])
            assert (r.video, r.annotation, r.images) == (s["video"], s["annotation"], s.get("images"))
            assert r.video_ext == (s["video_member"].rsplit(".", 1)[1] if s["video_member"] else "")
            assert r.image_members == ([(m["offset"], m["size"]) for m in s["image_members"]]
                                       if s.get("image_members") else None)
            assert (r.video_crc32, r.image_crc32) == (s.get("video_crc32"), [m["crc32"] for m in s["image_members"]]
                                                      if s.get("image_members") else None)
            assert (r.video_crc32 is not None) == (s["video"] is not None)       # ingest records each member's
        assert [cat.count(k) for k in ("video", "image", "text")] == [4, 4, 10]
        assert list(cat.uids("text")) == [u for u, (_, s) in enumerate(want) if s["video"] is None
                                          and not s.get("images")]
    again = Catalog.from_records(list(load_catalog(str(kinds))))
    assert [dataclasses.asdict(r) for r in again] == [dataclasses.asdict(r) for r in load_catalog(str(kinds))]
    assert again.fingerprint == names and cat[3:5] == [cat[3], cat[4]]
    with pytest.raises(IndexError, match="uid 18 out of range"):
        cat[18]


def test_catalog_files_are_mapped_rebuilt_when_torn_and_renamed_when_stale(kinds, tmp_path, monkeypatch, caplog):
    ref = [dataclasses.asdict(r) for r in load_catalog(str(kinds))]
    first = load_catalog(str(kinds), index_dir=tmp_path / "ix")
    (where,) = list((tmp_path / "ix").iterdir())
    assert where.name == f"catalog-shards-{first.key}"
    real = shards_mod._columns
    monkeypatch.setattr(shards_mod, "_columns", lambda *a: pytest.fail("the catalog was built again"))
    mapped = load_catalog(str(kinds), index_dir=tmp_path / "ix")
    assert is_mapped(mapped.blob) and [dataclasses.asdict(r) for r in mapped] == ref
    monkeypatch.setattr(shards_mod, "_columns", real)
    blob = where / "catalog.blob.npy"
    blob.write_bytes(blob.read_bytes()[:-7])                # torn: built again, the same
    assert [dataclasses.asdict(r) for r in load_catalog(str(kinds), index_dir=tmp_path / "ix")] == ref
    tar = resolve_shards(str(kinds))[-1]
    os.utime(index_path(tar), ns=(os.stat(tar).st_mtime_ns + 10**9,) * 2)   # an index rewritten: another directory
    assert load_catalog(str(kinds), index_dir=tmp_path / "ix").key != first.key
    assert len(list((tmp_path / "ix").iterdir())) == 2
    (tmp_path / "a_file").write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        held = load_catalog(str(kinds), index_dir=tmp_path / "a_file" / "ix")
    assert [dataclasses.asdict(r) for r in held] == ref and not is_mapped(held.blob)
    assert any("each process holds its own" in r.message and "a_file" in r.message for r in caplog.records)


def _plans_by_hand(planner: Planner, e: int):
    """The old planning loop: every sample in epoch order, its later pieces right after it, packed greedily."""
    order = loader_mod.epoch_order(planner.shard_of, seed=planner.seed, epoch=e, shuffle=planner.cfg.shuffle,
                                   buffer=planner.cfg.shuffle_buffer)
    n = len(planner.catalog)
    kept, lengths, rejects, cut, pieces = [], [], {}, {}, {}
    for uid in order.tolist():
        d = planner._plan(uid, e)
        if isinstance(d, PlanError):
            rejects[uid] = (d.reason, d.detail)
            continue
        kept.append(uid)
        lengths.append(d.length)
        if d.truncated:
            cut[uid] = d.truncated
        if d.pieces > 1:
            pieces[uid] = d.pieces
        for p in range(1, d.pieces):
            kept.append(uid + p * n)
            lengths.append(planner._plan(uid + p * n, e).length)
    packs = [[kept[i] for i in b] for b in pack_greedy(lengths, planner.cfg.seq_len, planner.cfg.pack_lookahead)]
    return packs, rejects, cut, pieces


@pytest.mark.parametrize("variant", [dict(text_overflow="continue"), dict(text_overflow="cut"),
                                     dict(text_overflow="continue", frame_jitter=0.5)],
                         ids=["continue", "cut", "jitter"])
def test_plans_on_disk_are_the_plans_made_by_hand(kinds, tmp_path, monkeypatch, variant):
    monkeypatch.setattr(Planner, "CHUNK", 5)      # 18 samples in 4 chunks, planned apart and merged
    cfg = small_cfg(kinds, tmp_path, seq_len=256, max_text_tokens=256, **variant)
    held = VideoPackedLoader(cfg, seed=3)
    disk = VideoPackedLoader(dataclasses.replace(cfg, index_dir=str(tmp_path / "ix")), seed=3)
    assert held.planner.plan_dir is None and disk.planner.plan_dir.parent == tmp_path / "ix"
    for e in range(3):
        want = _plans_by_hand(held.planner, e)
        for planner in (held.planner, disk.planner):
            p = planner.epoch(e)
            assert ([list(x) for x in p.packs], p.rejects, p.truncated, p.pieces) == want
        assert want[1] and (want[2] if variant["text_overflow"] == "cut" else want[3])
        assert all(is_mapped(a) for a in disk.planner.sizes(e)[:5])
    # a loader that finds the plans on disk makes none, and yields the same packs
    monkeypatch.setattr(Planner, "_build_sizes", lambda *a: pytest.fail("sizes planned again"))
    monkeypatch.setattr(Planner, "_build_packs", lambda *a: pytest.fail("packs planned again"))
    again = VideoPackedLoader(dataclasses.replace(cfg, index_dir=str(tmp_path / "ix")), seed=3)
    assert [signature(p) for p in take(again, 6)] == [signature(p) for p in take(held, 6)]


def test_loader_with_plans_on_disk_resumes_exactly(kinds, tmp_path):
    cfg = small_cfg(kinds, tmp_path, seq_len=512, index_dir=str(tmp_path / "ix"))
    assert_resumes_exactly(cfg, 4, 3, 4)
    plain = small_cfg(kinds, tmp_path, seq_len=512)
    assert [signature(p) for p in take(VideoPackedLoader(plain, seed=4), 7)] == \
        [signature(p) for p in take(VideoPackedLoader(cfg, seed=4), 7)]
    planner = VideoPackedLoader(cfg, seed=4).planner     # 11 packs an epoch: the 7 above stay in epoch 0

    def kept():
        return sorted({int(f.name[5:].split(".")[0]) for f in planner.plan_dir.glob("epoch*.items.npy")})
    for e in range(6):
        planner.epoch(e)
    assert kept() == [0, 1, 2, 3, 4, 5]   # planning ahead removes nothing: another node may be reading them
    loader = VideoPackedLoader(cfg, seed=4)    # one rank: no other reads more than 2 packs behind it (lag_packs)
    take(loader, sum(planner.num_packs(e) for e in range(4)) + 3)
    assert kept() == [3, 4, 5]    # consumed up to epoch 4's pack 2: the plans of epochs before 3 go


def test_planning_ahead_removes_no_plan_another_rank_reads(kinds, tmp_path):
    """data.video.num_epochs set and an index_dir shared by the ranks (the default <run_dir>/data_index): a rank
    starting its iteration counts the packs of every epoch left (planning them), and each plan it made removed those
    of the epochs before the one two before it, as a prefetching worker mapping a later epoch did; epoch 0's plan,
    which rank 0 was reading through its maps, was removed (old: epochs 1 and 2 gone, and epoch 0's file removed and
    written again by rank 1, another file than the one rank 0 maps). On NFS a file removed under another node's map
    is ESTALE, SIGBUS in the reader. Plans now go as the ranks consume past them."""
    cfg = small_cfg(kinds, tmp_path, seq_len=512, index_dir=str(tmp_path / "ix"), num_epochs=6)
    rank0, rank1 = (VideoPackedLoader(cfg, dp_rank=r, dp_world=2, seed=4) for r in range(2))
    alone = VideoPackedLoader(small_cfg(kinds, tmp_path, seq_len=512, num_epochs=6), dp_rank=0, dp_world=2, seed=4)
    first = take(rank0, 1)
    assert first[0].epoch == 0 and is_mapped(rank0.planner.epoch(0).order)
    mapped = os.stat(rank0.planner.plan_dir / "epoch0.items.npy").st_ino
    take(rank1, 1)
    kept = sorted({int(f.name[5:].split(".")[0]) for f in rank0.planner.plan_dir.glob("epoch*.items.npy")})
    assert kept == [0, 1, 2, 3, 4, 5], kept
    assert os.stat(rank0.planner.plan_dir / "epoch0.items.npy").st_ino == mapped
    assert [signature(p) for p in first + take(rank0, 3)] == [signature(p) for p in take(alone, 4)]


def test_a_plan_pruned_by_a_process_further_on_as_it_is_written_is_used_without_a_warning(kinds, tmp_path, monkeypatch,
                                                                                         caplog):
    """On data of a few packs an epoch one rank's prefetch runs epochs ahead of another's, and its prune
    (data/node_files.prune) can remove a plan the other has just written before that one reads it back. The arrays
    it built are whole: it uses them, says nothing, and goes on keeping its plans on disk."""
    from data import node_files

    cfg = small_cfg(kinds, tmp_path, seq_len=512, index_dir=str(tmp_path / "ix"))
    ahead, behind = (VideoPackedLoader(cfg, seed=4).planner for _ in range(2))
    real, ran = node_files._write, []

    def written_then_pruned(names, arrays):      # the other process passes epoch 3 (removing epochs 0-2) just then
        real(names, arrays)
        if names[0].name.startswith("epoch1.") and not ran:
            ran.append(ahead.release(3))
    monkeypatch.setattr(node_files, "_write", written_then_pruned)
    with caplog.at_level(logging.WARNING):
        got = behind.epoch(1)
    assert ran and not (behind.plan_dir / "epoch1.items.npy").exists()
    ref = VideoPackedLoader(small_cfg(kinds, tmp_path, seq_len=512), seed=4).planner.epoch(1)
    assert [list(p) for p in got.packs] == [list(p) for p in ref.packs] and (got.order == ref.order).all()
    assert not behind.index_note and "cannot be kept" not in caplog.text
    behind.epoch(2)
    assert is_mapped(behind.epoch(2).order)        # the next epoch's plan is mapped from disk again


def test_processes_of_two_nodes_with_the_same_pid_write_the_same_file_side_by_side(tmp_path, monkeypatch):
    """An index_dir shared by several nodes whose flock does not lock across them (Lustre mounted with localflock):
    a process on each node builds the same arrays at once, and containers give them the same pid. Both wrote through
    one temporary file: node B's truncated node A's under it and renamed it away, and node A's rename failed
    (FileNotFoundError: '.../epoch0.order.npy.<pid>.tmp' -> ...), so node A held its own copy with a warning (or, with
    other timings, published a file node B was still writing). Each host now writes its own temporary file."""
    import socket

    import numpy as np

    from data import node_files

    want = np.arange(50_000, dtype=np.int64)
    real_save, host = np.save, {"name": "node-a"}
    monkeypatch.setattr(socket, "gethostname", lambda: host["name"])

    def save(f, a):   # node B (same pid) writes its copy while node A is in the middle of writing its own
        real_save(f, a)
        if host["name"] == "node-a":
            f.flush()
            host["name"] = "node-b"
            node_files._write([tmp_path / "epoch0.order.npy"], (want,))
            host["name"] = "node-a"

    monkeypatch.setattr(np, "save", save)
    (got,), note = node_files.shared_arrays(tmp_path, "epoch0", ("order",), lambda: (want,),
                                            lambda a: node_files.shaped(a, [(len(want), np.int64)]))
    assert note == "" and is_mapped(got) and (got == want).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch0.lock", "epoch0.order.npy"]


def _plan_in_a_process(cfg, epochs, out, build_log):
    import time

    def logged(name):
        real = getattr(Planner, name)

        def run(self, e, *chunk):
            with open(build_log, "a") as f:
                f.write(f"{os.getpid()} {name} {e} {chunk}\n")
            time.sleep(0.3)        # long enough that the other processes ask while it runs
            return real(self, e, *chunk)
        return run

    for name in ("_build_sizes", "_build_packs"):
        setattr(Planner, name, logged(name))
    shards_mod._columns = (lambda real: lambda *a: (open(build_log, "a").write(f"{os.getpid()} catalog 0\n"),
                                                    real(*a))[1])(shards_mod._columns)
    loader = VideoPackedLoader(cfg, seed=6)
    packs = {e: [list(p) for p in loader.planner.epoch(e).packs] for e in epochs}
    open(out, "w").write(json.dumps(packs))


def test_processes_of_a_node_plan_each_epoch_once(kinds, tmp_path, monkeypatch):
    """Three processes plan two epochs: the catalog is read once, each chunk of documents is planned once (by the
    processes side by side), each epoch packed once; all three get the packs a process alone makes."""
    import multiprocessing as mp

    monkeypatch.setattr(Planner, "CHUNK", 4)      # 18 samples: 5 chunks

    cfg = small_cfg(kinds, None, seq_len=256, text_overflow="continue", index_dir=str(tmp_path / "ix"))
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_plan_in_a_process, args=(cfg, [0, 1], tmp_path / f"packs{i}.json",
                                                          tmp_path / "builds")) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    ref = VideoPackedLoader(dataclasses.replace(cfg, index_dir=""), seed=6).planner
    want = {str(e): [list(p) for p in ref.epoch(e).packs] for e in (0, 1)}
    assert all(json.loads((tmp_path / f"packs{i}.json").read_text()) == want for i in range(3))
    lines = [line.split(maxsplit=1) for line in (tmp_path / "builds").read_text().splitlines()]
    chunks = [f"_build_sizes 0 ({lo}, {min(lo + 4, 18)})" for lo in range(0, 18, 4)]
    assert sorted(what for _, what in lines) == sorted(["_build_packs 0 ()", "_build_packs 1 ()", "catalog 0"] + chunks)
    assert len({pid for pid, what in lines if what.startswith("_build_sizes")}) >= 2   # planned side by side
