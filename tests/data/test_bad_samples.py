"""Training-time bad samples: files that break after ingest (truncated, garbage, emptied, not a
video), a decoder that segfaults and one that hangs -> quarantined with a reason, never a crash;
N consecutive failures abort with a message."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from data.video.loader import VideoPackedLoader
from data.video.shards import ShardWriter, load_catalog
from data.video.synthetic import make_bad_videos

from .conftest import read_jsonl, small_cfg

BAD = ["zero_byte.mp4", "truncated_in_middle.mp4", "garbage_in_middle.mp4", "not_a_video.mp4",
       "truncated_after_header.mp4", "audio_only.mp4"]


def _broken_shards(shard_dir: Path, out: Path, *, n_good: int, bad: list[str], extra_good_tags=()) -> Path:
    """A shard whose bad members carry the metadata of a good video (as if corrupted after ingest)."""
    cat = load_catalog(str(shard_dir))
    cases = make_bad_videos(out / "bad_src", seed=1)
    out.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out, 0)
    spill = out / "good.bin"
    donors = cat[:max(n_good, 1)]
    for i, r in enumerate(donors[:n_good]):
        spill.write_bytes(Path(r.shard).read_bytes()[r.video_offset:r.video_offset + r.video_size])
        w.add_sample(f"good{i}", str(spill), "mp4", {"video": r.video, "annotation": r.annotation})
    for tag in extra_good_tags:                        # good files, but the decoder misbehaves on them
        r = donors[0]
        spill.write_bytes(Path(r.shard).read_bytes()[r.video_offset:r.video_offset + r.video_size])
        w.add_sample(tag, str(spill), "mp4", {"video": r.video, "annotation": r.annotation})
    for name in bad:
        key = "bad_" + name.split(".")[0]
        w.add_sample(key, cases[name]["path"], "mp4", {"video": donors[0].video, "annotation": {"caption": "x"}})
    w.close()
    return out


@pytest.mark.parametrize("backend,isolation", [("decord", "process"), ("pyav", "inline")])
def test_broken_files_are_quarantined(shard_dir, tmp_path, backend, isolation):
    d = _broken_shards(shard_dir, tmp_path / "s", n_good=3, bad=BAD)
    cfg = small_cfg(d, tmp_path, decode_backend=backend, decode_isolation=isolation, shuffle=False,
                    num_epochs=1)
    loader = VideoPackedLoader(cfg, seed=0)
    packs = list(loader)
    got = [k for p in packs for k in p.sample_keys]
    assert sorted(k.split("/")[1] for k in got) == ["good0", "good1", "good2"]
    q = read_jsonl(cfg.quarantine_path)
    assert sorted(r["key"] for r in q) == sorted("bad_" + b.split(".")[0] for b in BAD)
    assert all(r["shard"] == "shard-000000.tar" and r["reason"] and r["stage"] == "decode" for r in q)
    st = loader.stats
    assert st["samples_failed"] == len(BAD) and st["samples_ok"] == 3
    assert sum(st["failures_by_reason"].values()) == len(BAD)
    for p in packs:
        p.validate(cfg, loader.tokenizer)


def test_a_bad_sample_met_again_is_recorded_once(shard_dir, tmp_path):
    """A second loader over the same packs (a resumed run that trains them again, or the next evaluation of a
    held-out set) meets the same bad samples: its quarantine file already holds them, so it records none again. The
    count (stats) is the loader's own. A second epoch meets them again in other packs: recorded again."""
    d = _broken_shards(shard_dir, tmp_path / "s", n_good=3, bad=BAD[:3])
    cfg = small_cfg(d, tmp_path, shuffle=False, num_epochs=1, decode_isolation="process")
    first = VideoPackedLoader(cfg, seed=0)
    list(first)
    once = read_jsonl(cfg.quarantine_path)
    assert sorted(r["key"] for r in once) == sorted("bad_" + b.split(".")[0] for b in BAD[:3])
    again = VideoPackedLoader(cfg, seed=0)
    list(again)
    assert read_jsonl(cfg.quarantine_path) == once and again.stats["samples_failed"] == 3
    first.close(), again.close()
    two = VideoPackedLoader(replace(cfg, num_epochs=2), seed=0)
    list(two)
    two.close()
    recs = read_jsonl(cfg.quarantine_path)
    assert recs[:3] == once and sorted((r["epoch"], r["key"]) for r in recs[3:]) == \
        sorted((1, r["key"]) for r in once)


def test_segfault_and_hang_cost_one_sample_each(shard_dir, tmp_path, monkeypatch):
    d = _broken_shards(shard_dir, tmp_path / "s", n_good=2, bad=[], extra_good_tags=["crashme", "hangme"])
    cfg = small_cfg(d, tmp_path, shuffle=False, num_epochs=1, num_workers=1, sample_timeout_s=3.0,
                    decode_isolation="process")
    for spec in ("crash:crashme", "hang:hangme"):
        monkeypatch.setenv("KEYE_DECODE_FAULT", spec)
        loader = VideoPackedLoader(cfg, seed=0)
        packs = list(loader)
        keys = sorted(k.split("/")[1] for p in packs for k in p.sample_keys)
        bad = "crashme" if spec.startswith("crash") else "hangme"
        assert keys == sorted({"good0", "good1", "crashme", "hangme"} - {bad})
        reasons = {r["key"]: r["reason"] for r in read_jsonl(cfg.quarantine_path)}
        assert reasons[bad] == ("crashed" if bad == "crashme" else "timeout")
        loader.close()


def test_the_batch_timeout_names_the_setting_and_the_pack(shard_dir, tmp_path, monkeypatch):
    """data.video.batch_timeout_s shorter than a hung sample's decode: the error was torch's "DataLoader timed out
    after 1.0 seconds", which names neither the setting nor the pack the rank waited for."""
    d = _broken_shards(shard_dir, tmp_path / "s", n_good=1, bad=[], extra_good_tags=["hangme"])
    cfg = small_cfg(d, tmp_path, shuffle=False, num_workers=1, sample_timeout_s=30.0, batch_timeout_s=1.0,
                    decode_isolation="process")
    monkeypatch.setenv("KEYE_DECODE_FAULT", "hang:hangme")
    loader = VideoPackedLoader(cfg, seed=0)
    want = loader.position()
    assert any(k.endswith("/hangme") for k in want["keys"]), want
    with pytest.raises(RuntimeError) as e:
        next(loader)
    loader.close()
    msg = str(e.value)
    assert msg.startswith("video loader: rank 0: no packed sequence from its DataLoader workers within "
                          "data.video.batch_timeout_s = 1 s; the one awaited: epoch 0 pack 0 ("), msg
    assert "shard-000000.tar/hangme" in msg and "data.video.sample_timeout_s = 30 s" in msg, msg


def test_consecutive_failures_abort_with_message(shard_dir, tmp_path):
    d = _broken_shards(shard_dir, tmp_path / "s", n_good=0, bad=BAD[:4])
    cfg = small_cfg(d, tmp_path, shuffle=False, max_consecutive_failures=3, decode_isolation="inline")
    loader = VideoPackedLoader(cfg, seed=0)
    with pytest.raises(RuntimeError) as e:
        for _ in range(10):
            next(loader)
    msg = str(e.value)
    assert "3 consecutive samples failed" in msg and "max_consecutive_failures=3" in msg
    assert "bad_" in msg and str(d) in msg


@pytest.mark.parametrize("workers", [0, 1])
def test_shards_deleted_mid_run_stop_the_loader_naming_the_shard(shard_dir, tmp_path, workers):
    """The data directory removed while the loader reads it: no sample is to blame, so none is quarantined, and the
    loader stops at the first pack it cannot read instead of yielding packs of padding until
    max_consecutive_failures (100 by default: tens of training steps on nothing, whose checkpoints displaced the
    good ones). Packs a worker had built before the removal may still come (prefetch_factor 2 per worker)."""
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(shard_dir, d)
    cfg = small_cfg(d, tmp_path, shuffle=False, num_workers=workers, decode_isolation="process")
    loader = VideoPackedLoader(cfg, seed=0)
    first = next(loader)
    assert first.sample_keys and not first.failures
    shutil.rmtree(d)
    with pytest.raises(RuntimeError) as e:
        for _ in range(2 * 2 + 1):     # the packs prefetched by the worker, then the first built after the removal
            next(loader)
    loader.close()
    msg = str(e.value)
    assert f"shard {d}/shard-" in msg and "is gone" in msg and "moved or deleted" in msg, msg
    assert "consecutive" not in msg and read_jsonl(cfg.quarantine_path) == []


def test_a_few_failures_among_good_samples_do_not_abort(shard_dir, tmp_path):
    d = _broken_shards(shard_dir, tmp_path / "s", n_good=4, bad=BAD[:3])
    cfg = small_cfg(d, tmp_path, shuffle=True, shuffle_buffer=8, max_consecutive_failures=4,
                    decode_isolation="inline", num_epochs=1)
    packs = list(VideoPackedLoader(cfg, seed=3))
    assert len({k for p in packs for k in p.sample_keys}) == 4
    assert len(json.loads(json.dumps(read_jsonl(cfg.quarantine_path)))) == 3


def test_stale_spill_files_of_dead_workers_are_removed(tmp_path):
    from data.video.config import VideoDataConfig
    from data.video.loader import _HOST, FrameSource

    dead = tmp_path / f"keye-{_HOST}-999999-3-7.mp4"          # pid 999999 does not exist
    mine = tmp_path / f"keye-{_HOST}-{__import__('os').getpid()}-3-7.mp4"
    other_host = tmp_path / "keye-elsewhere-999999-3-7.mp4"
    for p in (dead, mine, other_host):
        p.write_bytes(b"x")
    FrameSource(VideoDataConfig(spill_dir=str(tmp_path))).close()
    assert not dead.exists() and mine.exists() and other_host.exists()


@pytest.mark.timeout(120)   # the old loader read empty epochs forever: a hang, not a failure
def test_shards_whose_every_sample_cannot_be_planned_stop_with_the_reasons(tmp_path):
    """Every sample rejected at plan time (here: text-only records with a question and no answer, which ingest
    let through before it checked them) leaves every epoch empty. The loader says so, with the reasons, instead
    of planning epoch after epoch without ever yielding a pack."""
    (tmp_path / "s").mkdir()
    w = ShardWriter(tmp_path / "s", 0)
    for key, annotation in (("unanswered0", {"qa": [{"question": "only a question"}]}),
                            ("unanswered1", {"qa": [{"q": "no answer either"}]})):
        w.add_text_sample(key, {"kind": "text", "video": None, "annotation": annotation})
    w.close()
    cfg = small_cfg(tmp_path / "s", tmp_path, seq_len=64, shuffle=False)
    loader = VideoPackedLoader(cfg, seed=0)
    with pytest.raises(RuntimeError, match=r"data\.video\.shards: none of the 2 samples can be planned \(epoch 0\).*"
                                           r"by reason: \{'no_text': 2\}; first: shard-000000\.tar/unanswered0: "
                                           r"no_text: .*data\.video\.seq_len \(64\)"):
        next(iter(loader))
    loader.close()


def _same_packs_with_a_full_spill_dir(cfg, want, small, tmp_path, caplog) -> None:
    """The loader with `small` as its spill directory gives the packs `want` (a roomy one's), none failed, and says
    once that `small` had no room."""
    import logging

    cfg = replace(cfg, spill_dir=str(small), quarantine_path=str(tmp_path / "q2.jsonl"))
    with caplog.at_level(logging.WARNING):
        loader = VideoPackedLoader(cfg, seed=0)
        got = [(p.sample_keys, p.pixel_values.sum().item()) for p in loader]
    assert got == want and loader.stats.get("samples_failed", 0) == 0 and len(got) > 0
    assert caplog.text.count(f"data.video.spill_dir={small} has no room for") == 1


def test_a_video_the_spill_directory_has_no_room_for_is_spilled_to_the_temp_dir(shard_dir, tmp_path, monkeypatch,
                                                                                caplog):
    """A tmpfs spill directory too small for a video (a container's 64 MB /dev/shm) failed every such video as
    read_error 'No space left on device', naming neither the directory nor the cure. The video now goes to the
    temporary directory's disk, with one warning; the samples are the ones a roomy spill directory gives."""
    import errno

    from data.video import loader as loader_module

    small = tmp_path / "shm"
    small.mkdir()
    real = loader_module.spill_member
    calls = []

    def full(shard, offset, size, path, **kw):
        calls.append(path)
        if str(path).startswith(str(small)):
            with open(path, "wb") as f:
                f.write(b"x")                                      # a partial file, as a full tmpfs leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(shard, offset, size, path, **kw)

    cfg = small_cfg(shard_dir, tmp_path, shuffle=False, num_epochs=1, decode_isolation="inline")
    want = [(p.sample_keys, p.pixel_values.sum().item()) for p in VideoPackedLoader(cfg, seed=0)]
    monkeypatch.setattr(loader_module, "spill_member", full)
    _same_packs_with_a_full_spill_dir(cfg, want, small, tmp_path, caplog)
    assert any(not str(c).startswith(str(small)) for c in calls) and not list(small.iterdir())


@pytest.mark.parametrize("full", ["asked", "child"])
def test_a_spill_directory_without_room_for_the_decoded_frames_sends_them_to_the_temp_dir(shard_dir, tmp_path,
                                                                                          monkeypatch, caplog, full):
    """The guarded child writes a sample's decoded frames beside its spilled video: a spill directory with room for
    the video but not its pixels (a 3-minute 640x360 clip: 3.5 MB of video, 100 MB of frames; a container's 64 MB
    /dev/shm) failed every such sample as `exception: OSError: [Errno 28] No space left on device`, with no word of
    the directory. Now the sample goes to the temporary directory where the spill directory has no room for both
    (`asked`: its free space, read before) or runs out while the child writes (`child`), with one warning; the packs
    are those of a roomy spill directory."""
    from data.video import loader as loader_module
    from data.video.loader import SampleFailure

    small = tmp_path / "shm"
    small.mkdir()
    cfg = small_cfg(shard_dir, tmp_path, shuffle=False, num_epochs=1, decode_isolation="process")
    want = [(p.sample_keys, p.pixel_values.sum().item()) for p in VideoPackedLoader(cfg, seed=0)]
    outs = []
    if full == "asked":
        real_room = loader_module._has_room
        monkeypatch.setattr(loader_module, "_has_room",
                            lambda d, n: not str(d).startswith(str(small)) and real_room(d, n))
    else:
        real = loader_module.FrameSource._guarded

        def guarded(self, op, out_path, **kw):
            outs.append(out_path)
            if str(out_path).startswith(str(small)):
                raise SampleFailure("exception", "OSError: [Errno 28] No space left on device")
            return real(self, op, out_path, **kw)

        monkeypatch.setattr(loader_module.FrameSource, "_guarded", guarded)
    _same_packs_with_a_full_spill_dir(cfg, want, small, tmp_path, caplog)
    assert not list(small.iterdir())
    if full == "child":
        assert any(str(o).startswith(str(small)) for o in outs) and any(not str(o).startswith(str(small)) for o in outs)


def _flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))


def corrupted_copy(tmp_path: Path) -> tuple[Path, dict]:
    """Shards of 3 videos and 2 images (ingested) copied, then one byte flipped in the middle of one video's member
    and of one image's: what a damaged disk, copy or upload does after ingest. Returns (the copy, key -> member)."""
    import shutil

    from data.video.ingest import IngestOptions, ingest
    from data.video.shards import index_path, resolve_shards
    from data.video.synthetic import make_synthetic_videos

    vids, ann = make_synthetic_videos(tmp_path / "src", 3, seed=4, max_seconds=1.5, n_images=2)
    ingest(IngestOptions(videos=str(vids), annotations=str(ann), out=str(tmp_path / "shards"), workers=1,
                         progress=False))
    shutil.copytree(tmp_path / "shards", tmp_path / "copy")
    (tar,) = resolve_shards(str(tmp_path / "copy"))
    samples = json.loads(Path(index_path(tar)).read_text())["samples"]
    video = next(s for s in samples if s["video"] is not None)
    image = next(s for s in samples if s.get("image_members"))
    assert video["video_crc32"] is not None and image["image_members"][0]["crc32"] is not None
    flipped = {video["key"]: (video["video_offset"], video["video_size"]),
               image["key"]: (image["image_members"][0]["offset"], image["image_members"][0]["size"])}
    for off, size in flipped.values():
        _flip(Path(tar), off + size // 2)
    return tmp_path / "copy", flipped


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_a_member_whose_bytes_changed_since_ingest_is_a_corrupt_member(tmp_path, isolation):
    """Ingest records each member's CRC32; a byte flipped in a video's and in an image's member after ingest makes
    those samples corrupt_member, naming the shard, the byte range and both CRCs, and the others train. H.264 and PNG
    decode much of such damage without a word (the frames of a flipped byte then trained as they came). Reference:
    the same shards without the flips (every sample decodes) and zlib's CRC32 of the member as ingest wrote it."""
    d, flipped = corrupted_copy(tmp_path)
    cfg = small_cfg(d, tmp_path, shuffle=False, num_epochs=1, decode_isolation=isolation)
    loader = VideoPackedLoader(cfg, seed=0)
    got = {k.split("/")[1] for p in loader for k in p.sample_keys}
    clean = VideoPackedLoader(replace(cfg, shards=str(tmp_path / "shards"), quarantine_path=""), seed=0)
    every = {k.split("/")[1] for p in clean for k in p.sample_keys}
    assert set(flipped) <= every and got == every - set(flipped)
    q = {r["key"]: r for r in read_jsonl(cfg.quarantine_path)}
    assert set(q) == set(flipped)
    for key, (off, size) in flipped.items():
        assert q[key]["reason"] == "corrupt_member", q[key]
        assert f"shard-000000.tar bytes {off}-{off + size - 1}: CRC32 " in q[key]["detail"], q[key]
        assert "the index says" in q[key]["detail"] and "write the shard again" in q[key]["detail"]
    assert loader.stats["failures_by_reason"] == {"corrupt_member": 2}
